"""The train stage under torchrun: 2 CPU processes, gloo, one set of outputs."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import toy_params
from drkd import checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120  # normally well under 60 s; generous for a busy 2-core box


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_train_stage_under_torchrun(tiny_data: Path, tmp_path: Path) -> None:
    params = toy_params(tmp_path / "params.yaml", student={"train": {"warmup_steps": 1}})
    models, plots, work = tmp_path / "models", tmp_path / "plots", tmp_path / "work"
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "stages.train", "student", "--params", str(params), "--data", str(tiny_data),
               "--out", str(models / "student.pt"), "--history", str(plots / "student.csv"),
               "--work-dir", str(work)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]

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
