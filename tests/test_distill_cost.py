"""benchmarks/distill_cost.py --methods: every method's train step, timed side by side."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import distill_cost
from benchmarks.distill_cost import rounds, row_settings
from conftest import Clock
from drkd.config import merge

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "benchmarks.distill_cost"


@pytest.mark.slow  # a subprocess training 3 methods' distillers (smoke preset)
def test_methods_table_has_a_row_per_method_relative_to_the_plain_student(tmp_path: Path) -> None:
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                   yaml.safe_load((ROOT / "presets" / "smoke.yaml").read_text()))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run(
        [sys.executable, "-m", SCRIPT, "--params", str(tmp_path / "params.yaml"),
         "--methods", "none", "drkd", "fgd", "--steps", "1", "--out", str(tmp_path / "t.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.split("|")[1:4] for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| method")]
    assert [name.strip() for name, _, _ in rows] == ["none", "drkd", "fgd"]
    seconds = {name.strip(): float(s) for name, s, _ in rows}
    assert all(s > 0 for s in seconds.values())
    for name, s, ratio in rows:  # each ratio is that method's time over the plain student's
        # (seconds printed to 4 significant digits, the ratio to 2 decimals)
        assert abs(float(ratio.strip().rstrip("x")) - float(s) / seconds["none"]) < 0.01, name
    written = json.loads((tmp_path / "t.json").read_text())["seconds_per_step"]
    assert set(written) == {"none", "drkd", "fgd"}
    assert all(abs(written[k] - seconds[k]) <= 1e-3 * seconds[k] for k in written)  # 4 digits


@pytest.mark.slow  # a subprocess timing the smoke preset's steps, two more for the peaks
def test_the_default_report_prints_the_ratio_and_both_peaks(tmp_path: Path) -> None:
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                   yaml.safe_load((ROOT / "presets" / "smoke.yaml").read_text()))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", SCRIPT, "--params", str(tmp_path / "params.yaml"),
                           "--steps", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ratio = re.search(r"step-time ratio distill / \(student \+ teacher forward\): ([0-9.]+)",
                      done.stdout)
    peaks = re.search(r"peak memory: student step ([0-9]+) MiB, distill step ([0-9]+) MiB",
                      done.stdout)
    assert ratio and float(ratio[1]) > 0, done.stdout
    assert peaks and int(peaks[1]) > 0 and int(peaks[2]) > 0, done.stdout


def test_an_unknown_method_is_one_error_line_before_any_work() -> None:
    done = subprocess.run([sys.executable, "-m", SCRIPT, "--methods", "none", "drkdx"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert "argument --methods: invalid choice: 'drkdx'" in done.stderr
    assert done.stdout == ""


def clocked_functions(monkeypatch: pytest.MonkeyPatch, seconds: dict[str, float],
                      calls: list[str]) -> dict[str, Callable[[], None]]:
    """Functions that each take ``seconds[name]`` on the benchmark's clock and log their call."""
    clock = Clock()
    monkeypatch.setattr(distill_cost, "time", clock)

    def call(name: str) -> None:
        calls.append(name)
        clock.advance(seconds[name])

    return {name: (lambda name=name: call(name)) for name in seconds}


def test_rounds_interleave_the_functions_after_the_warmup(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    fns = clocked_functions(monkeypatch, {"a": 1.0, "b": 2.0, "c": 4.0}, calls)
    times = rounds(fns, 4, torch.device("cpu"), warmup=2)
    assert calls == ["a", "b", "c"] * 6  # 2 warm-up rounds, then 4 timed ones, in turn
    assert times == {"a": [1.0] * 4, "b": [2.0] * 4, "c": [4.0] * 4}  # each call's own time


def test_settled_rounds_time_each_call_right_after_an_untimed_one_of_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    fns = clocked_functions(monkeypatch, {"a": 1.0, "b": 2.0}, calls)
    times = rounds(fns, 2, torch.device("cpu"), warmup=1, settle=1)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert times == {"a": [1.0, 1.0], "b": [2.0, 2.0]}  # the untimed call is not counted


@pytest.mark.slow  # a subprocess training 2 rows' distillers (smoke preset)
def test_rows_are_timed_with_their_cells_settings_and_keyed_by_row_name(tmp_path: Path) -> None:
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                   yaml.safe_load((ROOT / "presets" / "smoke.yaml").read_text()))
    # A tuned MGD row with DRKD's pixel relations on top: its step must run both methods' terms.
    params["compare"]["methods"] = {"none": {"method": "none"}, "mgd_pr": {
        "method": "mgd", "plus": ["drkd"], "w_ir": 0.0, "w_ins": 0.0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run(
        [sys.executable, "-m", SCRIPT, "--params", str(tmp_path / "params.yaml"),
         "--rows", "none", "mgd_pr", "--steps", "1", "--out", str(tmp_path / "t.json")],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| row")]
    assert rows == ["none", "mgd_pr"]
    written = json.loads((tmp_path / "t.json").read_text())["seconds_per_step"]
    assert set(written) == {"none", "mgd_pr"} and all(s > 0 for s in written.values())


def test_rows_take_their_cells_settings(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"distill": {"w_ir": 2.0}, "compare": {"methods": {
        "none": {}, "mgd_pr": {"method": "mgd", "plus": ["drkd"], "w_ir": 0, "w_ins": 0,
                               "mgd": {"weight": 3e-5}}}}}))
    settings = row_settings(str(params), ["mgd_pr", "none"])
    assert list(settings) == ["mgd_pr", "none"]
    mgd_pr = settings["mgd_pr"]
    assert (mgd_pr.method, mgd_pr.plus, mgd_pr.w_ir, mgd_pr.w_ins) == ("mgd", ("drkd",), 0, 0)
    assert mgd_pr.mgd.weight == 3e-5 and settings["none"].method == "none"


def test_an_unknown_row_is_one_error_line_naming_the_rows() -> None:
    done = subprocess.run([sys.executable, "-m", SCRIPT, "--rows", "none", "drkdx"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.startswith("error: params.yaml: compare.methods has no row 'drkdx' (rows: ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert done.stdout == ""


def test_quartiles_lie_within_the_values() -> None:
    """The per-round ratios' quartiles are interpolated inside the observations: with 2 or 3
    rounds they are neither extrapolated past them nor the min and max."""
    assert distill_cost.quartiles([1.0, 2.0]) == (1.25, 1.75)
    assert distill_cost.quartiles([1.0, 2.0, 3.0]) == (1.5, 2.5)
    assert distill_cost.quartiles([4.0]) == (4.0, 4.0)


def test_the_plain_students_peak_holds_no_teacher(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline's peak memory is the plain student's training alone: only the student's
    detector is built for it (the teacher's weights in memory raised the baseline's peak)."""
    from drkd.models import build_detector

    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                   yaml.safe_load((ROOT / "presets" / "smoke.yaml").read_text()))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    built: list[str] = []

    def spy(cfg, num_classes):  # type: ignore[no-untyped-def]
        built.append(cfg.backbone)
        return build_detector(cfg, num_classes)

    monkeypatch.setattr(distill_cost, "build_detector", spy)
    assert distill_cost.peak_memory(str(tmp_path / "params.yaml"), distill=False) > 0
    assert built == [params["student"]["model"]["backbone"]]
