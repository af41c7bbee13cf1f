"""benchmarks/gain.py: the summary, the report files and the teacher check (no training here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import gain

STATS = {"AP": 0.1, "APs": 0.1, "APm": 0.1, "APl": 0.1}


def finished(out: Path, name: str, ap: float) -> None:
    (out / name).mkdir(parents=True)
    (out / name / "metrics.json").write_text(json.dumps({**STATS, "AP": ap}))


def test_summary_without_and_with_teacher(tmp_path: Path) -> None:
    finished(tmp_path, "baseline-s0", 0.10)
    finished(tmp_path, "drkd-s0", 0.30)
    alone = gain.summarise(tmp_path, None)
    assert "gap_closed" not in alone["methods"]["drkd"]
    assert "| teacher |" not in gain.table(alone)
    teacher = {"AP": 50.0, "APs": 50.0, "APm": 50.0, "APl": 50.0}
    summary = gain.summarise(tmp_path, teacher)
    assert summary["methods"]["drkd"]["gap_closed"] == pytest.approx(0.5)
    assert "| **drkd** | mean of 1 | **30.0** |" in gain.table(summary)


def test_distillation_runs_need_the_teacher_but_baselines_do_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "gain"
    monkeypatch.setattr(sys, "argv", ["gain.py", "--out", str(out), "--runs", "drkd-s0"])
    with pytest.raises(SystemExit, match="models/teacher.pt missing"):
        gain.main()
    # Finished runs are skipped: nothing left to run redraws the report without a teacher.
    finished(out, "baseline-s0", 0.10)
    monkeypatch.setattr(sys, "argv", ["gain.py", "--out", str(out), "--runs", "baseline-s0",
                                      "--params", str(Path(__file__).parents[1] / "params.yaml")])
    gain.main()
    assert "| baseline | 0 | 10.0 |" in (out / "results.md").read_text()
    assert Image.open(out / "results.png").format == "PNG"
