"""The training loop: history, exact resume, fingerprints, NaN guard, schedules, the train stage."""

from __future__ import annotations

import csv
import hashlib
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import conftest
import drkd.recipe
import stages.train
from conftest import Clock, toy_model, toy_teacher, toy_train
from drkd import checkpoint, cli, engine
from drkd.config import NonFiniteLoss, UserError
from drkd.data.coco import CocoDetection
from drkd.data.transforms import train_transforms
from drkd.engine import fit, lr_factor, schedule
from drkd.models import build_detector


def dataset(tiny_data: Path, hflip: float = 0.5) -> CocoDetection:
    return CocoDetection(tiny_data / "train.json", train_transforms(hflip))


def detector(ds: CocoDetection, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_detector(toy_model(), ds.num_classes)


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


class Scripted(nn.Module):
    """A cheap stand-in for a detector: two named losses from one weight; NaN on call ``nan_at``."""

    def __init__(self, nan_at: int = -1, term: str = "loss_b") -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -1.0]))
        self.calls = 0
        self.nan_at = nan_at
        self.term = term

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, Any]]
                ) -> dict[str, torch.Tensor]:
        x = torch.stack([im.mean() for im in images]).mean()
        losses = {"loss_a": (self.w[0] * x - 1) ** 2, "loss_b": (self.w[1] - x) ** 2}
        if self.calls == self.nan_at:
            losses[self.term] = losses[self.term] * float("nan")
        self.calls += 1
        return losses


# -- (1) history and learning ------------------------------------------------------------------


def test_history_one_row_per_step(tiny_data: Path, tmp_path: Path) -> None:
    ds = dataset(tiny_data)
    cfg = toy_train(epochs=1, batch_size=2, log_every=1, warmup_steps=3)
    seen: list[tuple[int, dict[str, float]]] = []
    history = fit(detector(ds), ds, cfg, seed=0, work_dir=tmp_path,
                  on_step=lambda s, row: seen.append((s, row)))
    steps = len(ds) // cfg.batch_size
    assert [row["step"] for row in history] == [float(s) for s in range(1, steps + 1)]
    assert [s for s, _ in seen] == list(range(1, steps + 1))
    for (_, logged), row in zip(seen, history, strict=True):
        assert set(row) == {"step", "classification", "bbox_regression", "loss", "lr", "epoch",
                            "seconds", "peak_memory_mb", "threads"}
        assert logged == {k: v for k, v in row.items() if k != "step"}
        assert all(math.isfinite(v) for v in row.values())
        assert row["loss"] == pytest.approx(row["classification"] + row["bbox_regression"])
        expected_lr = cfg.lr * lr_factor(int(row["step"]) - 1, cfg, steps, steps)
        assert row["lr"] == pytest.approx(expected_lr)
    assert history[0]["lr"] == pytest.approx(cfg.lr * 0.001)  # first step is warm-up


def test_history_windows_average(tmp_path: Path, tiny_data: Path) -> None:
    """log_every=3 over 8 steps: rows at 3, 6 and the last step, each the window's mean."""
    ds = dataset(tiny_data)
    cfg = toy_train(epochs=2, batch_size=2, log_every=3)
    per_step: list[dict[str, float]] = []
    every = fit(Scripted(), ds, toy_train(epochs=2, batch_size=2, log_every=1), seed=0,
                work_dir=tmp_path / "a", on_step=lambda s, r: per_step.append(r))
    windows = fit(Scripted(), ds, cfg, seed=0, work_dir=tmp_path / "b")
    assert [r["step"] for r in windows] == [3.0, 6.0, 8.0]
    assert len(every) == 8
    for row, (lo, hi) in zip(windows, [(0, 3), (3, 6), (6, 8)], strict=True):
        for key in ("loss_a", "loss_b", "loss"):
            mean = sum(r[key] for r in every[lo:hi]) / (hi - lo)
            assert row[key] == pytest.approx(mean, rel=1e-6), (key, lo)
        assert row["lr"] == every[hi - 1]["lr"]


def test_loss_decreases_on_fixed_images(tiny_data: Path, tmp_path: Path) -> None:
    ds = dataset(tiny_data, hflip=0.0)
    fixed = Subset(ds, [0, 1] * 5)  # the same two images, 5 steps an epoch
    cfg = toy_train(epochs=2, batch_size=2, lr=2e-3, warmup_steps=2)
    history = fit(detector(ds), fixed, cfg, seed=0, work_dir=tmp_path)
    losses = [row["loss"] for row in history]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:2]) / 2, losses


# -- (2), (3) checkpoints and exact resume ------------------------------------------------------


class Killed(Exception):
    pass


def test_resume_reproduces_uninterrupted_run(tiny_data: Path, tmp_path: Path) -> None:
    """Kill after epoch 0's checkpoint, resume in a 'new process': same weights, same history.

    log_every=3 does not divide the 4 steps of an epoch, so a loss window spans the kill.
    """
    ds = dataset(tiny_data)  # hflip 0.5: augmentation draws from the global RNG
    cfg = toy_train(epochs=2, batch_size=2, log_every=3, warmup_steps=3, optimizer="adamw")

    full = detector(ds)
    history_a = fit(full, ds, cfg, seed=7, work_dir=tmp_path / "a", fingerprint="f")
    state_a = state_of(full)
    assert [r["step"] for r in history_a] == [3.0, 6.0, 8.0]

    def kill(epoch: int, module: nn.Module) -> None:
        raise Killed(epoch)

    work = tmp_path / "b"
    with pytest.raises(Killed):
        fit(detector(ds), ds, cfg, seed=7, work_dir=work, fingerprint="f", on_epoch=kill)
    assert sorted(p.name for p in work.iterdir()) == ["last.pt"]  # no temp files left over
    saved = checkpoint.load(work / "last.pt")
    assert (saved["epoch"], saved["step"], saved["fingerprint"]) == (0, 4, "f")

    resumed = detector(ds)  # a fresh process: same seed, same init, RNG not where epoch 0 left it
    epochs_run: list[int] = []
    history_b = fit(resumed, ds, cfg, seed=7, work_dir=work, fingerprint="f",
                    on_epoch=lambda e, m: epochs_run.append(e))
    assert epochs_run == [1]
    assert without_cost(history_b) == without_cost(history_a)  # seconds: wall time
    assert history_b[0] == saved["history"][0]  # epoch 0's row as the killed run logged it
    assert_same_state(state_of(resumed), state_a)

    # A finished run resumes to nothing and returns the same history.
    again = detector(ds)
    assert fit(again, ds, cfg, seed=7, work_dir=work, fingerprint="f") == history_b
    assert_same_state(state_of(again), state_a)


def test_a_checkpoint_of_another_device_or_precision_is_not_resumed(
        tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run killed on a GPU under fp16 (its scaler's state, CUDA RNG) is not continued on a
    CPU in fp32: it starts afresh and says why; one of this device and precision resumes."""
    ds = dataset(tiny_data)
    cfg = toy_train(epochs=1, batch_size=2)
    work = tmp_path / "work"
    fit(detector(ds), ds, cfg, seed=7, work_dir=work, fingerprint="f")
    saved = checkpoint.load(work / "last.pt")
    assert (saved["device"], saved["amp"]) == ("cpu", "None")
    checkpoint.save_atomic({**saved, "device": "cuda", "amp": "torch.float16"}, work / "last.pt")
    capsys.readouterr()
    epochs_run: list[int] = []
    fit(detector(ds), ds, cfg, seed=7, work_dir=work, fingerprint="f",
        on_epoch=lambda e, m: epochs_run.append(e))
    assert epochs_run == [0]
    assert "from another config, dataset, process count, device or precision" in (
        capsys.readouterr().out)


def test_a_given_model_of_zero_epochs_needs_no_batch_of_images() -> None:
    """epochs 0 keeps a given model as it is, on data of any size."""
    assert schedule(toy_train(epochs=0, batch_size=64), 10) == (0, 0)
    with pytest.raises(UserError, match="train.batch_size: 64 x 1 processes exceeds the 10"):
        schedule(toy_train(epochs=1, batch_size=64), 10)


COST_COLUMNS = ("seconds", "peak_memory_mb")  # what a run cost: differs between equal runs


def without_cost(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k not in COST_COLUMNS} for row in history]


def test_seconds_count_every_step_of_a_resumed_run_and_nothing_else(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The history's seconds column (compare's step time) sums the step loops of a killed run
    and its resumption: every one of the 8 steps (0.25 s of the engine's clock each), none of
    the epoch callbacks (100 s each)."""
    clock = Clock()
    monkeypatch.setattr(engine, "time", clock)
    step_s = 0.25  # a power of two: the sums below are exact

    class Slow(Scripted):
        def forward(self, images: list[torch.Tensor], targets: list[dict[str, Any]]
                    ) -> dict[str, torch.Tensor]:
            clock.advance(step_s)
            return super().forward(images, targets)

    def kill(epoch: int, module: nn.Module) -> None:
        clock.advance(100.0)
        raise Killed(epoch)

    ds = dataset(tiny_data)
    cfg = toy_train(epochs=2, batch_size=2, log_every=1)
    with pytest.raises(Killed):
        fit(Slow(), ds, cfg, seed=0, work_dir=tmp_path, fingerprint="f", on_epoch=kill)
    history = fit(Slow(), ds, cfg, seed=0, work_dir=tmp_path, fingerprint="f",
                  on_epoch=lambda e, m: clock.advance(100.0))
    assert [row["seconds"] for row in history] == [step_s * k for k in range(1, 9)]


def test_other_fingerprint_starts_afresh(tiny_data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    ds = dataset(tiny_data)
    cfg = toy_train(epochs=1, batch_size=2, log_every=1)
    module = Scripted()
    fit(module, ds, cfg, seed=0, work_dir=tmp_path, fingerprint="old")
    assert checkpoint.load(tmp_path / "last.pt")["fingerprint"] == "old"

    fresh = Scripted()
    history = fit(fresh, ds, cfg, seed=0, work_dir=tmp_path, fingerprint="new")
    captured = capsys.readouterr()
    assert "starting afresh" in captured.out + captured.err
    assert fresh.calls == 4 and [r["step"] for r in history] == [1.0, 2.0, 3.0, 4.0]
    assert_same_state(state_of(fresh), state_of(module))  # same seed, same data: same result
    assert checkpoint.load(tmp_path / "last.pt")["fingerprint"] == "new"

    same = Scripted()
    fit(same, ds, cfg, seed=0, work_dir=tmp_path, fingerprint="new")
    assert same.calls == 0  # resumed a finished run


def test_seed_changes_data_order(tiny_data: Path, tmp_path: Path) -> None:
    ds = dataset(tiny_data, hflip=0.0)
    cfg = toy_train(epochs=1, batch_size=2, log_every=1)
    a = fit(Scripted(), ds, cfg, seed=0, work_dir=tmp_path / "a")
    b = fit(Scripted(), ds, cfg, seed=0, work_dir=tmp_path / "b")
    c = fit(Scripted(), ds, cfg, seed=1, work_dir=tmp_path / "c")
    assert without_cost(a) == without_cost(b)
    assert [r["loss_a"] for r in a] != [r["loss_a"] for r in c]


# -- (4) non-finite loss -----------------------------------------------------------------------


def test_nan_loss_raises_and_keeps_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    ds = dataset(tiny_data)
    cfg = toy_train(epochs=2, batch_size=2, log_every=1)
    digests: list[str] = []

    def remember(epoch: int, module: nn.Module) -> None:
        digests.append(hashlib.md5((tmp_path / "last.pt").read_bytes()).hexdigest())

    module = Scripted(nan_at=5, term="loss_b")
    with pytest.raises(NonFiniteLoss) as info:
        fit(module, ds, cfg, seed=0, work_dir=tmp_path, desc="student", on_epoch=remember)
    message = str(info.value)
    assert "\n" not in message
    assert "step 5" in message and "'loss_b'" in message and "nan" in message
    assert str(tmp_path / "last.pt") in message
    assert len(digests) == 1  # epoch 0 finished, epoch 1 did not
    assert hashlib.md5((tmp_path / "last.pt").read_bytes()).hexdigest() == digests[0]
    state = checkpoint.load(tmp_path / "last.pt")
    assert (state["epoch"], state["step"]) == (0, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_nan_in_first_epoch_has_no_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    ds = dataset(tiny_data)
    with pytest.raises(NonFiniteLoss, match=r"step 1: loss term 'loss_a' is nan.*none yet"):
        fit(Scripted(nan_at=1, term="loss_a"), ds, toy_train(), seed=0, work_dir=tmp_path)
    assert not (tmp_path / "last.pt").exists()


# -- (5) learning-rate schedule ----------------------------------------------------------------


def test_warmup_then_cosine() -> None:
    cfg = toy_train(warmup_steps=10, schedule="cosine")
    total = 100
    assert lr_factor(0, cfg, total, 10) == pytest.approx(0.001)
    factors = [lr_factor(s, cfg, total, 10) for s in range(11)]
    assert all(a < b for a, b in zip(factors, factors[1:10], strict=False))  # rising
    cosine_at_10 = 0.5 * (1 + math.cos(math.pi * 10 / total))
    assert lr_factor(10, cfg, total, 10) == pytest.approx(cosine_at_10)  # warm-up done
    assert lr_factor(5, cfg, total, 10) == pytest.approx(
        (0.001 + 0.999 * 0.5) * 0.5 * (1 + math.cos(math.pi * 5 / total)))
    assert lr_factor(50, cfg, total, 10) == pytest.approx(0.5)
    assert lr_factor(total - 1, cfg, total, 10) < 0.001
    assert lr_factor(total, cfg, total, 10) == pytest.approx(0.0, abs=1e-12)
    later = [lr_factor(s, cfg, total, 10) for s in range(10, total + 1)]
    assert all(a >= b for a, b in zip(later, later[1:], strict=False))  # never rises again


def test_warmup_then_steps() -> None:
    cfg = toy_train(warmup_steps=4, schedule="step", milestones=(2, 3), gamma=0.1)
    spe = 5  # steps per epoch: milestones at steps 10 and 15
    assert lr_factor(0, cfg, 100, spe) == pytest.approx(0.001)
    assert lr_factor(2, cfg, 100, spe) == pytest.approx(0.001 + 0.999 * 0.5)
    assert [lr_factor(s, cfg, 100, spe) for s in (4, 9)] == [1.0, 1.0]
    assert lr_factor(10, cfg, 100, spe) == pytest.approx(0.1)
    assert lr_factor(14, cfg, 100, spe) == pytest.approx(0.1)
    assert lr_factor(15, cfg, 100, spe) == pytest.approx(0.01)
    assert lr_factor(99, cfg, 100, spe) == pytest.approx(0.01)


def test_no_warmup() -> None:
    cfg = toy_train(warmup_steps=0, schedule="step")
    assert lr_factor(0, cfg, 10, 5) == 1.0


# -- (6), (7) batch and step limits ------------------------------------------------------------


def test_batch_larger_than_dataset(tiny_data: Path, tmp_path: Path) -> None:
    ds = dataset(tiny_data)
    with pytest.raises(ValueError) as info:
        fit(Scripted(), ds, toy_train(batch_size=len(ds) + 1), seed=0, work_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and message.startswith("train.batch_size: 9 ")
    assert "8 training images" in message
    assert not (tmp_path / "last.pt").exists()


def test_max_steps_caps_training(tiny_data: Path, tmp_path: Path) -> None:
    ds = dataset(tiny_data)
    module = Scripted()
    cfg = toy_train(epochs=3, batch_size=2, log_every=2, max_steps=5, schedule="cosine",
                    warmup_steps=0)
    history = fit(module, ds, cfg, seed=0, work_dir=tmp_path)
    assert module.calls == 5
    assert [r["step"] for r in history] == [2.0, 4.0, 5.0]
    state = checkpoint.load(tmp_path / "last.pt")
    assert (state["step"], state["epoch"]) == (5, 1)
    # The schedule spans the capped run: the last step's lr is cosine at 4 of 5.
    assert history[-1]["lr"] == pytest.approx(cfg.lr * 0.5 * (1 + math.cos(math.pi * 4 / 5)))


def test_distributed_loader_matches_steps_per_epoch(tiny_data: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP every rank's loader yields exactly the steps_per_epoch fit plans for."""
    ds = Subset(dataset(tiny_data), range(7))
    monkeypatch.setattr(engine, "world", lambda: (1, 2))
    cfg = toy_train(batch_size=2)
    assert len(engine._loader(ds, cfg, seed=0, epoch=0)) == len(ds) // (2 * 2)


# -- (8) the train stage -----------------------------------------------------------------------


def toy_params(path: Path, **train: object) -> Path:
    return conftest.toy_params(path, student={"train": train}, teacher={"train": train})


def test_train_stage_writes_outputs(tiny_data: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    params = toy_params(tmp_path / "params.yaml")  # amp: bf16 by default, ignored on CPU
    out, history = tmp_path / "models" / "student.pt", tmp_path / "plots" / "student.csv"
    work = tmp_path / "work"
    argv = ["student", "--params", str(params), "--data", str(tiny_data), "--out", str(out),
            "--history", str(history), "--work-dir", str(work)]
    assert cli.run(stages.train.main, argv) == 0
    model, state = checkpoint.load_detector(out)
    assert type(model).__name__ == "RetinaNet"
    assert state["num_classes"] == 9 and len(state["category_ids"]) == 8
    assert state["model_config"]["fpn_channels"] == 16
    with history.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {"step", "bbox_regression", "classification", "loss", "lr", "epoch",
                            "seconds", "peak_memory_mb", "threads"}
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert not (work / "last.pt").exists()  # finished: nothing left to resume from
    capsys.readouterr()

    # Re-running a finished stage (DVC does so when an input changed) trains from the start.
    out.unlink()
    assert cli.run(stages.train.main, argv) == 0
    captured = capsys.readouterr()
    assert "resuming" not in captured.out + captured.err
    again, _ = checkpoint.load_detector(out)
    assert_same_state(again.state_dict(), model.state_dict())  # seeded: the same weights
    assert not (work / "last.pt").exists()


def test_code_digest_covers_the_loaded_package_sources(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The digest changes with the content of a loaded drkd/stages module or a newly loaded
    one; a loaded file elsewhere under the root (a venv, the tests) does not count."""
    root = tmp_path / "repo"

    def load(relative: str, text: str) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        module = types.ModuleType(relative)
        module.__file__ = str(path)
        monkeypatch.setitem(sys.modules, f"probe:{relative}", module)

    load("drkd/losses.py", "W = 1\n")
    load("stages/train.py", "pass\n")
    before = checkpoint.code_digest(root)
    assert checkpoint.code_digest(root) == before
    load(".venv/lib/site.py", "x = 1\n")
    load("tests/test_x.py", "x = 1\n")
    assert checkpoint.code_digest(root) == before
    load("drkd/losses.py", "W = 2\n")
    edited = checkpoint.code_digest(root)
    assert edited != before
    load("drkd/extra.py", "\n")
    assert checkpoint.code_digest(root) not in (before, edited)


def kill_after_first_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe's fit raises Killed right after epoch 0's checkpoint and callbacks."""
    real_fit = drkd.recipe.fit

    def fit_then_die(*args: Any, on_epoch: engine.EpochCallback, **kwargs: Any) -> Any:
        def on_epoch_then_die(epoch: int, module: nn.Module) -> None:
            on_epoch(epoch, module)
            raise Killed(epoch)

        return real_fit(*args, on_epoch=on_epoch_then_die, **kwargs)

    monkeypatch.setattr(drkd.recipe, "fit", fit_then_die)


def test_train_stage_resumes_a_killed_run_only_under_the_same_code(
        tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    params = toy_params(tmp_path / "params.yaml", epochs=2, log_every=3)

    def run(name: str) -> tuple[dict[str, torch.Tensor], str]:
        """Run the stage into <name>.pt / work_<name>; (saved weights, console output)."""
        argv = ["student", "--params", str(params), "--data", str(tiny_data),
                "--out", str(tmp_path / f"{name}.pt"), "--history", str(tmp_path / f"{name}.csv"),
                "--work-dir", str(tmp_path / f"work_{name}")]
        try:
            assert cli.run(stages.train.main, argv) == 0
        finally:
            captured = capsys.readouterr()
        return checkpoint.load(tmp_path / f"{name}.pt")["model"], captured.out + captured.err

    full, _ = run("full")

    for name in ("resumed", "edited"):
        with monkeypatch.context() as m:
            kill_after_first_epoch(m)
            with pytest.raises(Killed):
                run(name)
        assert checkpoint.load(tmp_path / f"work_{name}" / "last.pt")["epoch"] == 0

    weights, log = run("resumed")
    assert "resuming after epoch 1 (step 4)" in log
    assert_same_state(weights, full)
    def losses(name: str) -> list[dict[str, str]]:  # the history, less its cost columns
        with (tmp_path / f"{name}.csv").open() as fh:
            return [{k: v for k, v in row.items() if k not in COST_COLUMNS}
                    for row in csv.DictReader(fh)]

    assert losses("resumed") == losses("full")
    assert not (tmp_path / "work_resumed" / "last.pt").exists()

    # The same run after a code change (another code digest): trained from the start.
    monkeypatch.setattr(drkd.recipe, "code_digest", lambda: "edited code")
    weights, log = run("edited")
    assert "resuming" not in log and "starting afresh" in log
    assert_same_state(weights, full)
    assert not (tmp_path / "work_edited" / "last.pt").exists()


def test_distill_stage_resumes_only_under_the_same_distill_params(
        tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed distillation resumes under the same params and teacher; after an edit of
    `distill` it starts afresh. It writes the student and, with --modules-out, the
    training-only modules."""
    import stages.distill

    teacher = toy_teacher(tiny_data, tmp_path / "teacher.pt")
    small = {"pixel": {"nodes": [4] * 5, "states": [8] * 5},
             "instance": {"embed_dim": 16, "filter_hidden": 8}}

    def run(name: str, **distill: object) -> str:
        params = conftest.toy_params(tmp_path / f"{name}.yaml", student={"train": {"epochs": 2}},
                                     distill={**small, **distill})
        argv = ["--params", str(params), "--data", str(tiny_data), "--teacher", str(teacher),
                "--out", str(tmp_path / "s.pt"), "--history", str(tmp_path / "s.csv"),
                "--work-dir", str(tmp_path / "work"), "--modules-out", str(tmp_path / "m.pt")]
        try:
            assert cli.run(stages.distill.main, argv) == 0
        finally:
            captured = capsys.readouterr()
        return captured.out + captured.err

    for edit in ({}, {"w_ins": 0.5}):
        with monkeypatch.context() as m:
            kill_after_first_epoch(m)
            with pytest.raises(Killed):
                run("killed")
        log = run("again", **edit)
        assert ("resuming after epoch 1" in log) == (not edit), log[-500:]
        assert ("starting afresh" in log) == bool(edit), log[-500:]
    saved = checkpoint.load(tmp_path / "s.pt")["model"]  # the student alone, as a detector
    assert saved and not any(k.startswith(("student.", "method.", "teacher.")) for k in saved)
    modules = checkpoint.load(tmp_path / "m.pt")
    assert modules["distill_config"]["w_ins"] == 0.5
    assert any(k.startswith("method.glore_s.") for k in modules["modules"])


def test_distill_stage_refuses_a_teacher_of_other_categories(
        tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One error line naming the teacher checkpoint; nothing written."""
    import stages.distill

    path = toy_teacher(tiny_data, tmp_path / "teacher.pt", category_offset=100)
    out = tmp_path / "student.pt"
    code = cli.run(stages.distill.main, [
        "--params", str(conftest.toy_params(tmp_path / "params.yaml")), "--data", str(tiny_data),
        "--teacher", str(path), "--out", str(out), "--history", str(tmp_path / "s.csv"),
        "--work-dir", str(tmp_path / "work")])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {path}: trained on categories {{10") and (
        f"but {tiny_data / 'train.json'} has {{1: " in line)
    assert not out.exists() and not (tmp_path / "s.csv").exists()
