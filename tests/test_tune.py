"""stages/tune.py: the Optuna study over the distill params, on toy detectors and tiny data."""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import mlflow
import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState
from torch import nn

from conftest import TUNE_PARAMS, toy_teacher, tune_args
from drkd import tuning
from drkd.compare import cell_params
from drkd.config import (
    ConfigError,
    NonFiniteLoss,
    SearchSpace,
    TrainConfig,
    load_params,
    merge,
    parse_params,
    to_dict,
)
from drkd.devices import cores, thread_share
from drkd.engine import lr_factor, schedule
from drkd.recipe import shorten
from drkd.tracking import PIPELINE_ENV
from stages import tune

ROOT = Path(__file__).resolve().parents[1]
PNGS = ["optimization_history", "param_importances", "parallel_coordinate", "intermediate_values"]


@pytest.fixture(scope="module")
def teacher(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A (random) toy teacher checkpoint, as stages.train writes it."""
    return toy_teacher(tiny_data, tmp_path_factory.mktemp("teacher") / "teacher.pt")


def write_params(folder: Path, **tune_overrides: Any) -> Path:
    path = folder / "params.yaml"
    params = merge(TUNE_PARAMS, {"tune": tune_overrides})
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    load_params(path)
    return path


def load_study(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name="toy", storage=f"sqlite:///{folder / 'optuna.db'}")


def trials(folder: Path) -> list[optuna.trial.FrozenTrial]:
    return load_study(folder).get_trials()


def fake_ap(monkeypatch: pytest.MonkeyPatch, script: list[float | BaseException]) -> None:
    """Validation AP per evaluation, in call order (an exception is raised instead)."""
    calls = iter(script)

    def evaluate_ap(*_: Any) -> float:
        value = next(calls)
        if isinstance(value, BaseException):
            raise value
        return value

    monkeypatch.setattr(tuning, "evaluate_ap", evaluate_ap)


def test_last_epoch_matches_the_budget_fit_runs() -> None:
    cfg = TrainConfig(epochs=2, batch_size=4)  # 20 images: 5 steps per epoch
    assert tuning.last_epoch(cfg, 20) == 1
    assert tuning.last_epoch(dataclasses.replace(cfg, max_steps=6), 20) == 1
    assert tuning.last_epoch(dataclasses.replace(cfg, max_steps=5), 20) == 0
    assert tuning.last_epoch(dataclasses.replace(cfg, epochs=3, max_steps=100), 20) == 2


def test_search_space_convention() -> None:
    space = SearchSpace(w_pr=(1e-4, 1e-2), w_ir=(0.01,), w_ins=(), topk=(0, 4),
                        target=("matrix", "both"), lr=(1e-4, 1e-3))
    trial = optuna.create_study().ask()
    values = tuning.suggest(trial, space)
    dists = trial.distributions
    assert isinstance(dists["w_pr"], optuna.distributions.FloatDistribution) and dists["w_pr"].log
    assert values["w_ir"] == 0.01 and "w_ins" not in values  # [v] fixed, [] left out
    assert isinstance(dists["topk"], optuna.distributions.CategoricalDistribution)
    assert tuning.partial_params(values) == {
        "distill": {
            "w_pr": values["w_pr"],
            "w_ir": 0.01,
            "instance": {
                k: values[k] for k in ("tau", "topk", "filter_hidden", "filter", "target")
            },
        },
        "student": {"train": {"lr": values["lr"]}},
    }


def test_a_best_trial_at_the_edge_of_the_space_is_named() -> None:
    """Positions are on the log scale for a log range: 1.2e-5 in [1e-5, 1e-2] is 3% of the way
    up (the floor), though 10x the floor would look far from it on a linear scale."""
    floats = optuna.distributions.FloatDistribution
    choices = optuna.distributions.CategoricalDistribution

    def trial(**params: Any) -> optuna.trial.FrozenTrial:
        dists = {"alpha": floats(1e-5, 1e-2, log=True), "beta": floats(0.0, 1.0),
                 "mask": choices([0.45, 0.65, 0.85]), "filter": choices([True, False]),
                 "topk": choices([0, 2, 4])}
        return optuna.trial.create_trial(params=params, distributions=dists, value=0.3)

    edges = tuning.at_the_edge(trial(alpha=1.2e-5, beta=0.99, mask=0.45, filter=True, topk=2))
    assert edges == ["alpha 1.2e-05 at the floor of [1e-05, 0.01]",
                     "beta 0.99 at the ceiling of [0, 1]",
                     "mask 0.45: the smallest of [0.45, 0.65, 0.85]"]
    # 10x the floor is a third of the way up the log range; 0.5 of [0, 1]; a middle choice;
    # topk's 0 means every pair, so 4 is not its largest.
    assert tuning.at_the_edge(trial(alpha=1e-4, beta=0.5, mask=0.65, filter=False, topk=4)) == []
    # A range of one value ([a, a], which the loader allows) has no edge to be at.
    fixed = {"w": floats(0.06, 0.06, log=True)}
    assert tuning.at_the_edge(optuna.trial.create_trial(params={"w": 0.06}, distributions=fixed,
                                                        value=0.3)) == []


def test_the_edge_check_reads_the_current_space() -> None:
    """A study resumed in a widened range judges its old best by the range it has now."""
    old = optuna.trial.create_trial(
        params={"w_pr": 1.2e-5}, value=0.3,
        distributions={"w_pr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)})
    assert tuning.at_the_edge(old) == ["w_pr 1.2e-05 at the floor of [1e-05, 0.01]"]
    widened = SearchSpace(w_pr=(5e-8, 1e-2), w_ir=(), w_ins=(), tau=(), topk=(),
                          filter_hidden=(), filter=(), target=(), lr=())
    assert tuning.at_the_edge(old, widened) == []


@pytest.mark.parametrize(("method", "space", "error"), [
    ("drkd", {"space": {"topk": [-1, 2]}}, "tune.space.topk: -1 is not a valid value"),
    ("drkd", {"space": {"filter_hidden": [0, 64]}}, "tune.space.filter_hidden: 0 is not"),
    ("mgd", {"spaces": {"mgd": {"mask_ratio": [0.5, 1.5]}}},
     "tune.spaces.mgd.mask_ratio: 1.5 is not a valid value"),
])
def test_a_space_value_the_loader_refuses_stops_the_study_first(
        method: str, space: dict[str, Any], error: str) -> None:
    """A choice or range end that no trial could run with is one error before any trial, not
    a study that spends its budget on failed trials."""
    params = parse_params(merge(TUNE_PARAMS, {"tune": space}))
    with pytest.raises(ConfigError, match=re.escape(error)):
        tuning.check_space(params, method)
    tuning.check_space(parse_params(TUNE_PARAMS), method)  # the toy study's own space is valid


def test_the_default_space_keeps_the_params_target() -> None:
    """params.yaml's space leaves the IR target out: a trial keeps distill.instance.target
    (a `features` trial at the space's w_ir would be a second, heavier INS)."""
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    for trial in (optuna.create_study().ask() for _ in range(5)):
        values = tuning.suggest(trial, params.tune.space)
        assert "target" not in values and "target" not in trial.distributions
        assert "target" not in tuning.partial_params(values)["distill"].get("instance", {})


def test_a_trial_runs_the_student_recipe_compressed_to_the_tune_budget() -> None:
    over = {"student": {"train": {"epochs": 8, "warmup_steps": 300}}, "tune": {"epochs": 2}}
    trial = tuning.trial_params(parse_params(merge(TUNE_PARAMS, over)), {"w_pr": 5e-3})
    assert (trial.student.train.epochs, trial.student.train.warmup_steps) == (2, 75)
    assert trial.distill.w_pr == 5e-3


def test_the_cores_to_share_count_a_container_quota(tmp_path: Path) -> None:
    """A CPU quota (cgroup v2 cpu.max) caps the cores affinity shows, rounded up; "max" or no
    file leaves affinity's count."""
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    assert cores(cpu_max) == affinity  # no file
    for text, expect in [("max 100000", affinity), ("50000 100000", 1),
                         ("150000 100000", min(affinity, 2)), ("6400000 100000", affinity)]:
        cpu_max.write_text(text + "\n")
        assert cores(cpu_max) == expect, text


def test_a_shortened_recipe_warms_up_and_decays_over_the_same_fractions_of_its_length() -> None:
    """The paper's step recipe (24 epochs, drops at 16 and 22, 500 warm-up steps) at 2 epochs:
    its LR drops at 2/3 and 11/12 of the short run and ends at gamma^2, as the full one does
    (milestones left in full-recipe epochs never came, so it ended at the full LR). Under a
    `max_steps` cap the share counts steps, so the warm-up fits inside the run."""
    full = TrainConfig(epochs=24, batch_size=2, warmup_steps=500, schedule="step",
                       milestones=(16, 22), gamma=0.1)
    images = 2000  # 1000 steps an epoch
    for cfg in (full, shorten(full, 2, num_images=images)):
        per_epoch, total = schedule(cfg, images)
        factors = [lr_factor(round(f * total), cfg, total, per_epoch) for f in (0.6, 0.7, 0.95)]
        assert factors == pytest.approx([1.0, 0.1, 0.01]), (cfg.epochs, factors)
    short = shorten(full, 2)
    assert short.milestones == pytest.approx((16 / 12, 22 / 12)) and short.warmup_steps == 42
    capped = shorten(dataclasses.replace(full, schedule="cosine"), 2, 100, num_images=images)
    per_epoch, total = schedule(capped, images)
    assert total == 100 and capped.warmup_steps == round(500 * 100 / 24000) == 2
    assert shorten(full, 48, num_images=images) == dataclasses.replace(full, epochs=48)


@pytest.mark.slow
def test_a_trial_and_the_distill_stage_start_from_the_same_state(
    tiny_data: Path, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trial 0 (the params file's setting) and `stages.distill` enter the training
    loop with the same Distiller weights (student and DRKD modules) and the same RNG state,
    although the stage loads its teacher after seeding and the study before."""
    import drkd.recipe
    import stages.distill

    params = write_params(tmp_path, space={"w_ins": [1e-2]})  # trial 0: exactly the file's
    started: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []

    def record(module: nn.Module, *_: Any, **__: Any) -> list[dict[str, float]]:
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        started.append((state, torch.get_rng_state()))
        raise RuntimeError("recorded")

    monkeypatch.setattr(drkd.recipe, "fit", record)
    monkeypatch.setattr(tuning, "fit", record)
    with pytest.raises(RuntimeError, match="recorded"):
        stages.distill.main([
            "--params", str(params), "--data", str(tiny_data), "--teacher", str(teacher),
            "--out", str(tmp_path / "s.pt"), "--history", str(tmp_path / "s.csv"),
            "--work-dir", str(tmp_path / "work"),
        ])  # fmt: skip
    assert tune.main(tune_args(params, tiny_data, teacher, tmp_path, "--n-trials", "1")) == 0
    (stage, stage_rng), (trial, trial_rng) = started
    assert stage.keys() == trial.keys()
    assert any(k.startswith("method.glore_s.") for k in stage)
    different = [k for k in stage if not torch.equal(stage[k], trial[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    assert torch.equal(stage_rng, trial_rng)


@pytest.mark.slow
def test_study_writes_best_params_trials_and_plots(
    tiny_data: Path,
    teacher: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    saved_figures: dict[str, Any],
) -> None:
    params = write_params(tmp_path, epochs=2)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # trials' work dirs
    start = time.perf_counter()
    assert tune.main(tune_args(params, tiny_data, teacher, tmp_path)) == 0
    print(f"3 trials in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    out = tmp_path / "tuning"
    done = trials(tmp_path)
    assert [t.state for t in done] == [TrialState.COMPLETE] * 3
    # Trial 0 is the params file's own setting (w_ins = 0.01 is outside the fixed [1e-3]).
    defaults = tuning.current_values(load_params(params))
    assert "w_ins" not in defaults and defaults["w_ir"] == 1e-2 and defaults["tau"] == 1
    assert {k: v for k, v in done[0].params.items() if k != "w_ins"} == defaults
    assert all(sorted(t.intermediate_values) == [1, 2] for t in done)  # AP after each epoch
    assert len({tuple(sorted(t.params.items())) for t in done}) == 3
    best = yaml.safe_load((out / "best_params.yaml").read_text())
    assert set(best) == {"distill"} and best["distill"]["w_ins"] == 1e-3
    best_trial = load_study(tmp_path).best_trial
    assert best["distill"]["instance"]["target"] == best_trial.params["target"]
    merged = parse_params(merge(yaml.safe_load(params.read_text()), best))
    assert merged.distill.w_pr == best_trial.params["w_pr"]
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert {r["state"] for r in rows} == {"COMPLETE"} and all(float(r["AP"]) >= 0 for r in rows)
    assert {"duration_s", "fail_reason", "param_w_pr", "param_target"} <= set(rows[0])
    assert sorted(saved_figures) == sorted(f"{name}.png" for name in PNGS)
    assert all((out / name).is_file() for name in saved_figures)
    # The plots show this study: each trial's AP in order, its AP after each epoch, the
    # searched parameters.
    (history,) = saved_figures["optimization_history.png"].axes
    assert history.get_title() == "Optimization History Plot"
    assert history.collections[0].get_offsets().tolist() == [
        [float(t.number), t.value] for t in done]
    (epochs,) = saved_figures["intermediate_values.png"].axes
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in epochs.get_lines()] == [
        ([1, 2], [t.intermediate_values[1], t.intermediate_values[2]]) for t in done]
    importances = saved_figures["param_importances.png"].axes[0]
    labels = {t.get_text() for t in importances.get_yticklabels()}
    assert labels and labels <= set(done[0].params)
    parallel = saved_figures["parallel_coordinate.png"].axes[0]
    assert parallel.get_title() == "Parallel Coordinate Plot"
    (lines,) = parallel.collections  # one polyline per trial
    assert len(lines.get_segments()) == len(done)
    assert list((tmp_path / "tmp").iterdir()) == []  # deleted after each trial
    log = capsys.readouterr().out
    assert log.count("[tune] trial ") == 3 and "| best: trial" in log
    # Rerunning with the budget met runs nothing and rewrites the same outputs.
    assert tune.main(tune_args(params, tiny_data, teacher, tmp_path)) == 0
    assert len(trials(tmp_path)) == 3


@pytest.mark.slow
def test_pruned_and_failed_trials_are_recorded_and_the_study_goes_on(
    tiny_data: Path,
    teacher: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Also the MLflow test: one parent run, one nested run per trial with its state and AP."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(PIPELINE_ENV, "pipe-tune")
    params = write_params(tmp_path, n_trials=5, epochs=2, pruner="median")
    params.write_text(params.read_text().replace("enabled: false", "enabled: true"))
    # Trials 0 and 1 complete; 2 hits a non-finite loss: pruned as diverged (a bad outcome the
    # sampler learns from, not a FAIL it ignores); 3 is far below the median: pruned; 4 falls
    # below the median only in its last epoch: complete (it ran its whole budget).
    bad = NonFiniteLoss("[trial 2] step 1: loss term 'loss_ir' is nan")
    fake_ap(monkeypatch, [0.3, 0.4, 0.2, 0.5, bad, 0.0, 0.45, 0.0])
    assert tune.main(tune_args(params, tiny_data, teacher, tmp_path)) == 0
    done = trials(tmp_path)
    assert [t.state for t in done] == [
        TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED,
        TrialState.COMPLETE,
    ]  # fmt: skip
    assert done[2].user_attrs["fail_reason"].startswith("diverged: NonFiniteLoss: [trial 2]")
    assert done[2].intermediate_values == {}
    assert done[3].intermediate_values == {1: 0.0}  # stopped after its first epoch
    rows = list(csv.DictReader((tmp_path / "tuning" / "trials.csv").open()))
    assert [(r["state"], r["AP"]) for r in rows] == [
        ("COMPLETE", "0.4"), ("COMPLETE", "0.5"), ("PRUNED", ""), ("PRUNED", "0"),
        ("COMPLETE", "0"),
    ]  # fmt: skip
    assert rows[2]["fail_reason"].startswith("diverged: NonFiniteLoss")
    assert rows[3]["fail_reason"] == ""  # pruned by the median: no reason
    best = yaml.safe_load((tmp_path / "tuning" / "best_params.yaml").read_text())
    assert best["distill"]["w_pr"] == done[1].params["w_pr"]
    assert "(diverged: NonFiniteLoss: [trial 2]" in capsys.readouterr().out

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["drkd"], output_format="list")
    (parent,) = [r for r in runs if r.info.run_name == "tune"]
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert tags["dvc_stage"] == "tune" and tags["pipeline_id"] == "pipe-tune"
    assert tags["study"] == "toy" and tags["git_commit"]
    assert parent.data.metrics["best_AP"] == 0.5 and parent.data.metrics["pruned"] == 2
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"best_params.yaml", "trials.csv", "optimization_history.png"} <= artifacts
    children = sorted(
        (r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
        key=lambda r: int(r.data.tags["trial"]),
    )
    assert [(r.data.tags["state"], r.info.status) for r in children] == [
        ("COMPLETE", "FINISHED"),
        ("COMPLETE", "FINISHED"),
        ("PRUNED", "KILLED"),
        ("PRUNED", "KILLED"),
        ("COMPLETE", "FINISHED"),
    ]
    assert children[1].data.metrics["AP"] == 0.5 and "AP" not in children[3].data.metrics
    assert children[2].data.tags["fail_reason"].startswith("diverged: NonFiniteLoss")
    assert children[0].data.params["target"] == done[0].params["target"]
    assert all(r.data.metrics["duration_s"] >= 0 for r in children)
    history = mlflow.MlflowClient().get_metric_history(children[0].info.run_id, "epoch_AP")
    assert [(m.step, m.value) for m in history] == [(0, 0.3), (1, 0.4)]


@pytest.mark.slow
def test_hyperband_prunes_at_the_default_budget(
    tiny_data: Path, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hyperband's first rung is one epoch of resource: at 2 epochs a trial behind the rung's
    best after its first epoch is pruned (reported as step 0, the rung fell on the last epoch,
    which is never pruned)."""
    params = write_params(tmp_path, n_trials=3, epochs=2, pruner="hyperband")
    fake_ap(monkeypatch, [0.5, 0.6, 0.1, 0.9, 0.95])
    assert tune.main(tune_args(params, tiny_data, teacher, tmp_path)) == 0
    done = trials(tmp_path)
    assert [t.state for t in done] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.COMPLETE]
    assert [t.intermediate_values for t in done] == [{1: 0.5, 2: 0.6}, {1: 0.1}, {1: 0.9, 2: 0.95}]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_resume_fails_the_stale_trial_of_a_killed_worker(
    tiny_data: Path, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = write_params(tmp_path, n_trials=3, grace_s=3)
    fake_ap(monkeypatch, [0.1, 0.2, 0.3])
    # A worker killed mid-trial: trial 0 RUNNING, its heartbeat no longer refreshed.
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=1
    )
    study = optuna.create_study(study_name="toy", storage=storage, direction="maximize")
    study.ask()
    study_id = storage.get_study_id_from_name("toy")
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(study_id, 0))
    # Past tune.grace_s (3) by more than a second: SQLite's now() has 1 s resolution, so a
    # heartbeat 3.5 s old can read as 3 s, not stale, at the resumed worker's first look.
    time.sleep(4.5)
    assert tune.main(tune_args(params, tiny_data, teacher, tmp_path)) == 0
    done = trials(tmp_path)
    # The dead worker's trial does not count: 3 trials ran their course, the first of them
    # the dead one again (an ask() without values: it draws its own).
    assert [t.state for t in done] == [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert done[1].user_attrs["retry_of"] == 0
    rows = list(csv.DictReader((tmp_path / "tuning" / "trials.csv").open()))
    assert rows[0]["fail_reason"] == "no heartbeat: its worker died"


@pytest.mark.slow
def test_a_trial_stopped_by_ctrl_c_runs_again_with_its_values(
    tiny_data: Path, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in trial 0 (params.yaml's values): the study resumed runs those values again and
    ends with n_trials trials that ran their course; the stopped one is not one of them."""
    params = write_params(tmp_path, n_trials=2, epochs=1)
    fake_ap(monkeypatch, [KeyboardInterrupt(), 0.1, 0.2])
    with pytest.raises(KeyboardInterrupt):
        tune.main(tune_args(params, tiny_data, teacher, tmp_path))
    assert tune.main(tune_args(params, tiny_data, teacher, tmp_path)) == 0
    done = trials(tmp_path)
    assert [t.state for t in done] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert done[0].user_attrs["interrupted"] and done[0].params
    assert done[1].params == done[0].params
    assert done[1].user_attrs == {**done[1].user_attrs, "retry_of": 0, "from": "params.yaml"}
    # A trial that fails with an error counts: a broken objective cannot loop for ever.
    fake_ap(monkeypatch, [RuntimeError("broken")])
    assert tune.main([*tune_args(params, tiny_data, teacher, tmp_path), "--n-trials", "3"]) == 0
    assert [t.state for t in trials(tmp_path)][3:] == [TrialState.FAIL]


@pytest.mark.slow
def test_a_study_without_a_complete_trial_leaves_no_best_params(
    tiny_data: Path, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier study's best_params.yaml in OUT would be promoted as this study's: with no
    complete trial it is removed, not left in place."""
    params = write_params(tmp_path, n_trials=1, epochs=1)
    stale = tmp_path / "tuning" / "best_params.yaml"
    stale.parent.mkdir()
    stale.write_text("# Best of Optuna study 'toy': trial 9\ndistill: {w_pr: 0.5}\n")
    fake_ap(monkeypatch, [RuntimeError("broken")])
    assert tune.main(tune_args(params, tiny_data, teacher, tmp_path)) == 0
    assert [t.state for t in trials(tmp_path)] == [TrialState.FAIL]
    assert not stale.exists() and (tmp_path / "tuning" / "trials.csv").is_file()


def test_a_study_refuses_a_changed_list_of_choices(
    tiny_data: Path, teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Optuna would fail every new trial at its first suggestion: one line instead, before any
    trial; a widened range is fine."""
    params = write_params(tmp_path, n_trials=1)
    study = optuna.create_study(study_name="toy", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.add_trial(optuna.trial.create_trial(
        params={"filter_hidden": 32, "w_pr": 0.01}, value=0.1,
        distributions={"filter_hidden": optuna.distributions.CategoricalDistribution([16, 32]),
                       "w_pr": optuna.distributions.FloatDistribution(1e-3, 0.1, log=True)}))
    assert tune.cli.run(tune.main, tune_args(params, tiny_data, teacher, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tune.space.filter_hidden: ") and "(16, 32)" in err
    assert "start a new study" in err and err.count("\n") == 1
    assert len(trials(tmp_path)) == 1


@pytest.mark.slow
def test_two_workers_share_one_study(tiny_data: Path, teacher: Path, tmp_path: Path) -> None:
    """`--workers 2`: two processes, each with its share of the cores, one study."""
    params = write_params(tmp_path, n_trials=5, epochs=1)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [sys.executable, "-m", "stages.tune", *tune_args(params, tiny_data, teacher, tmp_path),
           "--workers", "2"]
    done_run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = done_run.stdout + done_run.stderr
    assert done_run.returncode == 0, log
    share = thread_share(2)
    assert f"[tune] 2 workers, {share} thread(s) each" in log
    done = trials(tmp_path)
    assert [t.number for t in done] == list(range(5))
    assert all(t.state == TrialState.COMPLETE for t in done)
    by_worker = Counter(t.user_attrs["worker"] for t in done)
    assert len(by_worker) == 2, by_worker  # both ran trials, none lost or run twice
    assert {t.user_attrs["threads"] for t in done} == {share}
    assert log.count("[tune] trial ") == 5


def test_promote_prints_the_dvc_line_and_applies_only_distill(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    out = tmp_path / "tuning"
    out.mkdir()
    best = {
        "distill": {"w_pr": 2.5e-05, "instance": {"target": "both", "topk": 4, "filter": False}},
        "student": {"train": {"lr": 0.0003}},
    }
    (out / "best_params.yaml").write_text("# header\n" + yaml.safe_dump(best))
    base = ["--promote", "--out", str(out), "--params", str(params)]
    assert tune.main(base) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("dvc exp run -S ")
    before = yaml.safe_load(params.read_text())
    from dvc.utils.hydra import apply_overrides  # the line, as DVC applies it

    by_dvc = tmp_path / "by_dvc.yaml"
    by_dvc.write_text(params.read_text())
    apply_overrides(str(by_dvc), shlex.split(line)[4::2])
    assert yaml.safe_load(by_dvc.read_text()) == merge(before, best)
    assert tune.main([*base, "--apply"]) == 0
    assert "baseline student" in capsys.readouterr().out
    text = params.read_text()
    after = yaml.safe_load(text)
    assert after == merge(before, best)
    assert after["distill"]["w_pr"] == 2.5e-05  # read back as a float, not a string
    assert "# matrix (paper) | features (release) | both" in text  # comments kept
    assert "storage: \"\"" in text  # and quotes
    assert {k for k in before if before[k] != after[k]} == {"distill", "student"}
    assert after["student"]["model"] == before["student"]["model"]
    load_params(params)


def test_promote_as_a_compare_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--row mgd_tuned`: the tuned values become a compare row beside the published `mgd`, as a
    `dvc exp run` line that DVC's own Hydra overrides apply, or written in place."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "tuning" / "mgd").mkdir(parents=True)
    best = {"distill": {"mgd": {"weight": 3.5e-06, "mask_ratio": 0.85}}}
    (tmp_path / "tuning" / "mgd" / "best_params.yaml").write_text(yaml.safe_dump(best))
    base = ["--promote", "--method", "mgd", "--row", "mgd_tuned", "--out",
            str(tmp_path / "tuning"), "--params", str(params)]
    assert tune.main(base) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("dvc exp run compare/dvc.yaml -S ")  # the row runs in that pipeline
    row = {"method": "mgd", "mgd": {"weight": 3.5e-06, "mask_ratio": 0.85}}
    by_dvc = tmp_path / "by_dvc.yaml"
    by_dvc.write_text(params.read_text())
    apply_overrides(str(by_dvc), [flag for flag in shlex.split(line)[4:] if flag != "-S"])
    assert yaml.safe_load(by_dvc.read_text())["compare"]["methods"]["mgd_tuned"] == row
    before = yaml.safe_load(params.read_text())
    assert tune.main([*base, "--apply"]) == 0
    after = yaml.safe_load(params.read_text())
    assert after["compare"]["methods"] == {**before["compare"]["methods"], "mgd_tuned": row}
    assert after["distill"] == before["distill"]  # the published mgd row is untouched
    assert cell_params(str(params), "mgd_tuned", 0)["distill"]["mgd"] == {
        **before["distill"]["mgd"], **row["mgd"]}
    # A row of that name exists now: promoting onto it would merge into (or replace) a row.
    assert tune.cli.run(tune.main, base) == 2
    assert "compare.methods has a row 'mgd_tuned' already" in capsys.readouterr().err
    base[base.index("mgd_tuned")] = "mgd_tuned2"
    # A tuned lr is not a `distill` setting: no row can carry it.
    best["student"] = {"train": {"lr": 0.001}}
    (tmp_path / "tuning" / "mgd" / "best_params.yaml").write_text(yaml.safe_dump(best))
    assert tune.cli.run(tune.main, base) == 2
    assert "tunes student.train.lr; a compare row sets `distill` only" in capsys.readouterr().err


def test_promote_into_distill_brings_the_method_and_refuses_another_studys_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """MGD's tuned values promoted into `distill` (whose method is drkd) set distill.method:
    mgd, else the study would change nothing; a file whose header names another study is
    refused."""
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "tuning" / "mgd").mkdir(parents=True)
    best_file = tmp_path / "tuning" / "mgd" / "best_params.yaml"
    best = {"distill": {"mgd": {"weight": 3.5e-06, "mask_ratio": 0.85}}}
    header = "# Best of Optuna study '{}': trial 3, validation AP 0.0577 (9 complete of 10).\n"
    best_file.write_text(header.format("drkd-mgd") + yaml.safe_dump(best))
    argv = ["--promote", "--method", "mgd", "--out", str(tmp_path / "tuning"), "--params",
            str(params), "--apply"]
    assert load_params(params).distill.method == "drkd"
    assert tune.main(argv) == 0
    after = load_params(params).distill
    assert after.method == "mgd" and after.mgd.weight == 3.5e-06 and after.mgd.mask_ratio == 0.85
    best_file.write_text(header.format("old-mgd") + yaml.safe_dump(best))
    capsys.readouterr()
    assert tune.cli.run(tune.main, argv) == 2
    assert capsys.readouterr().err == (
        f"error: {best_file}: the best of study 'old-mgd', not of 'drkd-mgd' (tune.study_name, "
        "--method); run that study or pick its --out\n")


def test_errors_are_one_line(
    tiny_data: Path, teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = write_params(tmp_path)
    missing = tmp_path / "none.pt"
    assert tune.cli.run(tune.main, tune_args(params, tiny_data, missing, tmp_path)) == 2
    assert "none.pt: teacher checkpoint not found" in capsys.readouterr().err
    params.write_text(params.read_text().replace("n_trials: 3", "n_trials: many"))
    assert tune.cli.run(tune.main, tune_args(params, tiny_data, teacher, tmp_path)) == 2
    assert "tune.n_trials: expected a positive int" in capsys.readouterr().err
    assert tune.cli.run(tune.main, ["--promote", "--out", str(tmp_path / "nothing")]) == 2
    assert "best_params.yaml: not found" in capsys.readouterr().err
    params = write_params(tmp_path)
    nowhere = f"sqlite:///{tmp_path / 'no' / 'such' / 'folder.db'}"
    argv = [*tune_args(params, tiny_data, teacher, tmp_path), "--storage", nowhere]
    assert tune.cli.run(tune.main, argv) == 2
    assert capsys.readouterr().err == (
        f"error: {nowhere}: the folder {tmp_path / 'no' / 'such'} does not exist\n")


@pytest.mark.slow
def test_any_method_can_be_tuned_in_its_own_study(
    tiny_data: Path, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--method pkd` searches tune.spaces.pkd in study `<name>-pkd`, trains the student with
    PKD, and writes OUT/pkd/best_params.yaml that promotes into distill.pkd only."""
    trained: list[str] = []
    real = tuning.distill_and_evaluate

    def spy(params: Any, *rest: Any, **kw: Any) -> float:
        trained.append(params.distill.method)
        assert 1.0 <= params.distill.pkd.weight <= 30.0
        return real(params, *rest, **kw)

    monkeypatch.setattr(tuning, "distill_and_evaluate", spy)
    fake_ap(monkeypatch, [0.1, 0.2, 0.3, 0.4])
    params = write_params(tmp_path, epochs=1, n_trials=2,
                          spaces={"pkd": {"weight": [1.0, 30.0]}})
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert tune.main(tune_args(params, tiny_data, teacher, tmp_path, "--method", "pkd")) == 0
    assert trained == ["pkd", "pkd"]
    study = optuna.load_study(study_name="toy-pkd", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    done = study.get_trials()
    assert done[0].params == {"weight": 10.0}  # trial 0: the params file's own value
    assert done[1].distributions["weight"].log
    best = yaml.safe_load((tmp_path / "tuning" / "pkd" / "best_params.yaml").read_text())
    assert best == {"distill": {"pkd": {"weight": study.best_trial.params["weight"]}}}
    assert not (tmp_path / "tuning" / "best_params.yaml").exists()  # DRKD's is untouched
    names = optuna.get_all_study_names(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert names == ["toy-pkd"]  # DRKD's study "toy" is not touched
    # Another method's space maps onto its own section (mimic: distill.w_mimic).
    assert tuning.partial_params({"w_mimic": 0.01}, "mimic") == {"distill": {"w_mimic": 0.01}}
    fgd = tuning.trial_params(load_params(params), {"alpha": 0.002}, "fgd")
    assert fgd.distill.method == "fgd" and fgd.distill.fgd.alpha == 0.002


def test_calibrate_measures_each_term_against_the_detection_loss(
    tiny_data: Path, teacher: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--calibrate: every FGD term, its ratio to the detection loss and the weight range for
    0.1x..10x. At step 1 (no update yet) a term is exactly linear in its weight, so ten times
    the weight gives ten times the ratio; the range is weight * (0.1, 10) / ratio."""
    from drkd.data.coco import CocoDetection
    from drkd.data.transforms import train_transforms
    from drkd.distiller import load_teacher

    train = CocoDetection(tiny_data / "train.json", train_transforms(0.0))
    model = load_teacher(teacher, train)
    params = load_params(write_params(tmp_path))
    rows = {r["term"]: r for r in tuning.calibrate(params, "fgd", model, train, 1, tmp_path / "a")}
    assert set(rows) == {"loss_fgd_fg", "loss_fgd_bg", "loss_fgd_att", "loss_fgd_global"}
    fg = rows["loss_fgd_fg"]
    assert fg["dimension"] == "alpha" and fg["weight"] == params.distill.fgd.alpha
    assert fg["ratio"] > 0
    assert fg["suggested"] == pytest.approx((fg["weight"] * 0.1 / fg["ratio"],
                                             fg["weight"] * 10 / fg["ratio"]))
    assert fg["space"] == params.tune.spaces["fgd"].alpha
    alpha = {"distill": {"fgd": {"alpha": 10 * fg["weight"]}}}
    tenfold = parse_params(merge(to_dict(params), alpha))
    again = {r["term"]: r
             for r in tuning.calibrate(tenfold, "fgd", model, train, 1, tmp_path / "b")}
    assert again["loss_fgd_fg"]["ratio"] == pytest.approx(10 * fg["ratio"], rel=1e-4)
    assert again["loss_fgd_bg"]["ratio"] == pytest.approx(rows["loss_fgd_bg"]["ratio"], rel=1e-4)

    argv = tune_args(write_params(tmp_path), tiny_data, teacher, tmp_path, "--method", "pkd",
                "--calibrate", "2")
    assert tune.main(argv) == 0
    out = capsys.readouterr().out
    assert "| loss_pkd | weight |" in out and "pkd: each term / the detection loss" in out
