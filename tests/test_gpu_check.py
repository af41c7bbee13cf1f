"""benchmarks/gpu_check.py: refuses to run without CUDA; its code paths run on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "benchmarks.gpu_check"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_refuses_without_cuda() -> None:
    done = subprocess.run([sys.executable, "-m", SCRIPT], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 2
    assert "needs CUDA" in done.stderr
    assert "|" not in done.stdout  # no table of CPU numbers passed off as GPU ones


@pytest.mark.slow  # train and distill steps, then a distillation under torchrun
def test_every_code_path_runs_on_cpu_at_toy_sizes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", SCRIPT, "--cpu-smoke", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-1000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| smoke |")]
    assert [row.split("|")[2].strip() for row in rows] == ["fp32", "bf16", "fp16"]
    assert all("| yes |" in row for row in rows)
    assert "rank 0 wrote the student" in done.stdout
    assert "| drkd (paper preset, release) |" in done.stdout  # benchmarks.paper_scale's rows
    assert "| drkd IR learned |" in done.stdout
