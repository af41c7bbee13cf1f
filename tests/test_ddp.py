"""The train stage and a comparison cell under torchrun: 2 CPU processes, gloo, one set of
outputs."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, single_process_env, toy_params, toy_teacher
from drkd import checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120  # generous for a busy 2-core box


# `python -m stages.train ARGV` that exits with 3 right after epoch 0's checkpoint. A script of
# its own, not test_engine's in-process kill_after_first_epoch: only the stage's own modules
# may count in the code digest, so its fingerprint is the one the stage run would write.
KILLED_AFTER_EPOCH_0 = """
import sys
import drkd.recipe
import stages.train
from drkd import cli
fit = drkd.recipe.fit
def fit_then_die(*args, on_epoch, **kwargs):
    def on_epoch_then_die(epoch, module):
        on_epoch(epoch, module)
        sys.exit(3)
    return fit(*args, on_epoch=on_epoch_then_die, **kwargs)
drkd.recipe.fit = fit_then_die
sys.exit(cli.run(stages.train.main, sys.argv[1:]))
"""


def test_train_stage_under_torchrun(tiny_data: Path, tmp_path: Path) -> None:
    params = toy_params(tmp_path / "params.yaml", student={"train": {"warmup_steps": 1}})
    models, plots, work = tmp_path / "models", tmp_path / "plots", tmp_path / "work"

    def stage_args(out: Path, history: Path, work_dir: Path) -> list[str]:
        return ["student", "--params", str(params), "--data", str(tiny_data), "--out", str(out),
                "--history", str(history), "--work-dir", str(work_dir)]

    # A killed single-process run of the same stage left its epoch-0 state in the work dir:
    # 4 steps at one rank's batches and shard, which a 2-process run must not continue.
    argv = stage_args(models / "student.pt", plots / "student.csv", work)
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_EPOCH_0, *argv], cwd=ROOT,
                            env=single_process_env(), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert killed.returncode == 3, killed.stderr[-3000:]
    assert checkpoint.load(work / "last.pt")["step"] == 4
    # Its fingerprint is the stage's own: a 1-process run resumes from a copy of it.
    check = tmp_path / "check"
    shutil.copytree(work, check / "work")
    same = subprocess.run(
        [sys.executable, "-m", "stages.train",
         *stage_args(check / "student.pt", check / "student.csv", check / "work")],
        cwd=ROOT, env=single_process_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert same.returncode == 0 and "resuming after epoch 1" in same.stdout + same.stderr

    env = single_process_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "stages.train", *argv]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "resuming" not in log and "starting afresh" in log

    # Each of the 2 ranks takes half of the 8 images: 8 // (2 x 2) = 2 steps, not 4.
    with (plots / "student.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(float(r["loss"]) > 0 for r in rows)

    # Only rank 0 writes: one checkpoint, one history; the finished run leaves nothing to resume.
    assert sorted(p.name for p in models.iterdir()) == ["student.pt"]
    assert sorted(p.name for p in plots.iterdir()) == ["student.csv"]
    assert list(work.iterdir()) == []
    # Loaded strictly: the saved model is the unwrapped module (no DDP 'module.' prefix).
    _, state = checkpoint.load_detector(models / "student.pt")
    assert state["model_config"]["fpn_channels"] == 16


def test_compare_cell_trains_under_the_launcher(tiny_data: Path, tmp_path: Path) -> None:
    """A comparison cell trains as the main pipeline does, `<launcher> -m stages.distill`: with
    torchrun, 2 ranks (2 steps, not 4) and one set of outputs, the cost read from rank 0."""
    launcher = ("python -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 "
                f"--master_port={free_port()}")
    params = toy_params(tmp_path / "params.yaml", launcher=launcher,
                        student={"train": {"warmup_steps": 1}},
                        compare={"methods": {"pkd": {}}, "seeds": [0]})
    teacher = toy_teacher(tiny_data, tmp_path / "teacher.pt")
    out = tmp_path / "cells" / "pkd-s0"
    proc = subprocess.run(
        [sys.executable, "-m", "stages.compare", "cell", "pkd", "0", "--params", str(params),
         "--out", str(out), "--data", str(tiny_data), "--teacher", str(teacher)],
        cwd=tmp_path, env={**single_process_env(), "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (out / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert float(rows[-1]["loss_pkd"]) > 0
    cost = json.loads((out / "cost.json").read_text())
    assert cost["steps"] == 2 and cost["peak_memory_mb"] == float(rows[-1]["peak_memory_mb"]) > 0
    assert sorted(p.name for p in out.iterdir()) == [
        "cost.json", "detections.json", "history.csv", "metrics.json", "model.pt", "params.yaml"]


KILLED_DISTILL_AFTER_EPOCH_0 = KILLED_AFTER_EPOCH_0.replace("stages.train", "stages.distill")


def test_two_nodes_match_one_node_and_resume(tiny_data: Path, tmp_path: Path) -> None:
    """`torchrun --nnodes=2` (two launchers on this machine, c10d rendezvous on 127.0.0.1,
    gloo, 1 process each) distils as one node with 2 processes does, weight for weight; a
    run killed after epoch 0 on both nodes resumes from rank 0's checkpoint; only rank 0
    writes."""
    params = toy_params(tmp_path / "params.yaml", distill={"method": "pkd"},
                        student={"train": {"warmup_steps": 1, "epochs": 2}})
    teacher = toy_teacher(tiny_data, tmp_path / "teacher.pt")

    def stage_args(folder: Path) -> list[str]:
        return ["--params", str(params), "--data", str(tiny_data), "--teacher", str(teacher),
                "--out", str(folder / "student.pt"), "--history", str(folder / "history.csv"),
                "--work-dir", str(folder / "work")]

    def two_nodes(target: list[str]) -> list[subprocess.CompletedProcess[str]]:
        rdzv = [f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d",
                "--rdzv-id=drkd-test", "--nnodes=2", "--nproc-per-node=1"]
        nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *rdzv,
                                   *target], cwd=ROOT, text=True,
                                  env={**single_process_env(), "PYTHONPATH": str(ROOT)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for _ in range(2)]
        try:  # read both while they run: a full pipe would stall its rank and so the other
            outputs = [n.communicate(timeout=TIMEOUT_S)[0] for n in nodes]
        finally:
            for n in nodes:
                n.kill()
        return [subprocess.CompletedProcess(n.args, n.returncode, out, "")
                for n, out in zip(nodes, outputs, strict=True)]

    one = tmp_path / "one"
    single = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
         "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "stages.distill",
         *stage_args(one)], cwd=ROOT, env=single_process_env(), capture_output=True, text=True,
        timeout=TIMEOUT_S)
    assert single.returncode == 0, single.stderr[-3000:]

    two = tmp_path / "two"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_DISTILL_AFTER_EPOCH_0)
    killed = two_nodes([str(script), *stage_args(two)])
    assert all(k.returncode != 0 for k in killed), [k.stdout[-2000:] for k in killed]
    assert (two / "work" / "last.pt").is_file(), killed[0].stdout[-3000:]
    assert checkpoint.load(two / "work" / "last.pt")["step"] == 2  # epoch 0 of 2 ranks
    resumed = two_nodes(["-m", "stages.distill", *stage_args(two)])
    assert all(r.returncode == 0 for r in resumed), [r.stdout[-3000:] for r in resumed]
    assert sum("resuming after epoch 1" in r.stdout for r in resumed) == 1  # rank 0 logs

    assert sorted(p.name for p in two.iterdir()) == ["history.csv", "student.pt", "work"]
    assert list((two / "work").iterdir()) == []
    with (two / "history.csv").open() as a, (one / "history.csv").open() as b:
        steps = [[(r["step"], r["loss"]) for r in csv.DictReader(f)] for f in (a, b)]
    assert steps[0] == steps[1] and [s for s, _ in steps[0]] == ["1", "2", "3", "4"]
    weights = [checkpoint.load(f / "student.pt")["model"] for f in (one, two)]
    assert weights[0].keys() == weights[1].keys()
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])


def test_a_resumed_ddp_run_continues_every_ranks_random_stream(tmp_path: Path) -> None:
    """Under torchrun, ranks that draw different amounts of random numbers (MGD's masks on
    batches of other sizes, Faster R-CNN's sampling) resume each from its own state: 1 epoch
    then a resumed second equals 2 straight, weight for weight (with rank 0's state restored on
    every rank it did not). The logged losses are the whole batch's (every rank logs the same
    means), not rank 0's share."""
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
         "--master-addr=127.0.0.1", f"--master-port={free_port()}",
         str(ROOT / "tests" / "ddp_resume.py"), str(tmp_path)],
        cwd=ROOT, env={**single_process_env(), "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    refused = (f"{tmp_path}/local{{}}/last.pt: the ranks would resume from different steps "
               "([4, -1], -1: afresh); the work dir must be on storage that every rank reads")
    assert result == {"resumed_equals_straight": True, "logged_losses_equal_on_every_rank": True,
                      "steps": 4, "ranks_draw_their_own_numbers": True,
                      "local_work_dirs_refused_on_every_rank": [refused.format(0),
                                                                refused.format(1)]}


CRASHING_RANK_0 = """
import torch, torch.distributed as dist
from drkd.engine import distributed
with distributed():
    if dist.get_rank() == 0:
        raise RuntimeError("rank 0 failed")
    dist.all_reduce(torch.ones(1))  # rank 1 waits here for a rank 0 that is gone
"""


def test_a_rank_that_fails_ends_the_run_instead_of_hanging(tmp_path: Path) -> None:
    """Rank 0 fails while rank 1 waits in a collective: rank 0 exits (no barrier in its way)
    and torchrun stops rank 1, in seconds rather than at gloo's 30-minute timeout."""
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_RANK_0)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
         "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script)],
        cwd=ROOT, env={**single_process_env(), "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=TIMEOUT_S)
    assert run.returncode != 0 and "rank 0 failed" in run.stderr
