"""The comparison's leaderboard (drkd/leaderboard.py) from finished cells written by hand, and a
cell's params: its row's distill section, the seed and the shortened budget it trains with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from matplotlib.figure import Figure

from drkd import leaderboard as board_lib
from drkd.compare import cell_params, launch, trains_drkd_modules
from drkd.config import UserError, load_params, to_dict
from drkd.registry import FgdConfig
from stages import compare, leaderboard


def write_cell(cells: Path, row: str, seed: int, ap: float, step_s: float, mem: float,
               method: str | None = None, overrides: dict | None = None) -> None:
    folder = cells / f"{row}-s{seed}"
    folder.mkdir(parents=True)
    stats = {"AP": ap, "AP50": ap + 0.1, "APs": ap / 2, "APm": ap, "APl": ap * 1.5}
    (folder / "metrics.json").write_text(json.dumps(stats))
    (folder / "cost.json").write_text(json.dumps(
        {"row": row, "method": method or row, "overrides": overrides or {}, "seed": str(seed),
         "seconds_per_step": step_s, "peak_memory_mb": mem}))


def test_leaderboard_numbers(tmp_path: Path, saved_figures: dict[str, Any]) -> None:
    cells = tmp_path / "cells"
    for seed, (ap_none, ap_pkd) in enumerate([(0.10, 0.20), (0.12, 0.26)]):
        write_cell(cells, "none", seed, ap_none, 0.5, 1000.0)
        write_cell(cells, "pkd", seed, ap_pkd, 0.6 + 0.2 * seed, 1200.0 + seed)
    teacher = tmp_path / "teacher.json"
    teacher.write_text(json.dumps({"AP": 0.41}))
    assert leaderboard.main(["--cells", str(cells), "--teacher-metrics", str(teacher),
                         "--out", str(tmp_path)]) == 0
    board = json.loads((tmp_path / "leaderboard.json").read_text())
    pkd, none = board["methods"]["pkd"], board["methods"]["none"]
    assert pkd["per_seed"]["0"]["AP"] == pytest.approx(20.0)
    assert pkd["mean"]["AP"] == pytest.approx(23.0) and none["mean"]["AP"] == pytest.approx(11.0)
    assert pkd["spread"] == pytest.approx(6.0)
    assert pkd["gain"] == pytest.approx(12.0)
    assert pkd["gap_closed"] == pytest.approx(12.0 / 30.0)  # teacher 41 vs baseline 11
    assert pkd["step_time_vs_baseline"] == pytest.approx(0.7 / 0.5)
    assert pkd["memory_vs_baseline"] == pytest.approx(1201.0 / 1000.0)
    table = (tmp_path / "leaderboard.md").read_text()
    assert table.index("| pkd |") < table.index("| none |")  # best first
    assert "| 40% |" in table and "20.0, 26.0" in table
    # Paired against the best row (pkd): none - pkd per seed = 10 - 20, 12 - 26.
    assert none["vs_top"]["per_seed"] == {"0": pytest.approx(-10.0), "1": pytest.approx(-14.0)}
    assert pkd["vs_top"] is None
    # 95% interval of the mean paired difference: -12 +- t(0.975, 1) * sd / sqrt(2), sd = 2.83
    # (12.706 * 2.828 / 1.414 = 25.4): it covers 0, so the lead is within noise.
    low, high = none["vs_top"]["ci95"]
    assert low == pytest.approx(-12.0 - 25.412, abs=0.01)
    assert high == pytest.approx(-12.0 + 25.412, abs=0.01)
    assert none["vs_top"]["within_noise"] is True
    assert "| -12.0 [-37.4, +13.4], within noise (-14.0..-10.0) |" in table
    # The compact table holds every cell and rebuilds the same board.
    again = tmp_path / "again"
    assert leaderboard.main(["--cells", str(tmp_path / "cells.csv"), "--teacher-metrics",
                             str(teacher), "--out", str(again)]) == 0
    assert json.loads((again / "leaderboard.json").read_text()) == board
    assert (again / "cells.csv").read_text() == (tmp_path / "cells.csv").read_text()
    assert len((tmp_path / "cells.csv").read_text().splitlines()) == 1 + 4
    # The plot: AP bars best first with each seed a dot and the teacher a line; APs/APm/APl
    # bars; mean AP against the step time relative to the baseline.
    ap, sizes, cost = saved_figures["leaderboard.png"].axes
    assert [t.get_text() for t in ap.get_xticklabels()] == ["pkd", "none"]
    assert [bar.get_height() for bar in ap.patches] == pytest.approx([23.0, 11.0])
    assert [list(dots.get_offsets()[:, 1]) for dots in ap.collections] == [
        pytest.approx([20.0, 26.0]), pytest.approx([10.0, 12.0])]
    (teacher_line,) = ap.get_lines()
    assert list(teacher_line.get_ydata()) == pytest.approx([41.0, 41.0])
    assert [t.get_text() for t in sizes.get_legend().get_texts()] == ["APs", "APm", "APl"]
    # Bars by size key, then by row (pkd, none): APs = AP / 2, APm = AP, APl = 1.5 AP.
    assert [bar.get_height() for bar in sizes.patches] == pytest.approx(
        [11.5, 5.5, 23.0, 11.0, 34.5, 16.5])
    points = sorted(tuple(p) for dots in cost.collections for p in dots.get_offsets())
    assert points == [pytest.approx((1.0, 11.0)), pytest.approx((1.4, 23.0))]
    assert sorted(t.get_text() for t in cost.texts) == ["none", "pkd"]


def test_close_rows_names_on_the_cost_panel_go_one_line_apart(
        tmp_path: Path, saved_figures: dict[str, Figure]) -> None:
    def row(ap: float, step_time: float) -> dict[str, Any]:
        return {"method": "mgd", "mean": {"AP": ap, "APs": ap, "APm": ap, "APl": ap},
                "per_seed": {0: {"AP": ap}}, "step_time_vs_baseline": step_time}

    summary = {"teacher_AP": None, "methods": {
        "a": row(38.7, 1.43), "b": row(38.6, 1.39), "c": row(38.3, 1.41), "far": row(13.8, 1.0)}}
    board_lib.plot(summary, tmp_path / "board.png")
    cost = saved_figures["board.png"].axes[2]
    lift = {text.get_text(): text.xyann[1] for text in cost.texts}
    assert lift == {"a": 2, "b": -8, "c": -18, "far": 2}


def test_side_by_side_step_times_replace_the_cells_own(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no metrics/teacher.json: no gap closed
    cells = tmp_path / "cells"
    for row, method, step_s in [("none", None, 0.5), ("pkd", None, 2.0), ("pkd_x", "pkd", 1.0),
                                ("pkd_y", "pkd", 1.0), ("cwd", None, 0.6), ("pkd_ir", "pkd", 1.0)]:
        plus = {"plus": ["drkd"]} if row == "pkd_ir" else None
        write_cell(cells, row, 0, 0.2, step_s, 1000.0, method=method, overrides=plus)
    times = tmp_path / "times.json"
    times.write_text(json.dumps({"seconds_per_step": {"none": 0.25, "pkd": 0.3, "pkd_y": 0.35}}))
    assert leaderboard.main(["--cells", str(cells), "--step-times", str(times),
                             "--out", str(tmp_path / "board")]) == 0
    board = json.loads((tmp_path / "board" / "leaderboard.json").read_text())["methods"]
    assert board["pkd"]["step_time_vs_baseline"] == pytest.approx(1.2)  # not the cells' 4.0
    assert board["pkd_x"]["step_time_vs_baseline"] == pytest.approx(1.2)  # its method's
    assert board["pkd_y"]["step_time_vs_baseline"] == pytest.approx(1.4)  # timed as itself
    assert "step_time_vs_baseline" not in board["cwd"]  # not timed side by side
    assert "step_time_vs_baseline" not in board["pkd_ir"]  # pkd's terms and DRKD's: not pkd's
    table = (tmp_path / "board" / "leaderboard.md").read_text()
    assert "every method timed side by side, ../times.json;" in table and "| 1.20x |" in table
    times.write_text(json.dumps({"seconds_per_step": {"pkd": 0.3}}))
    with pytest.raises(UserError, match="times.json: expected seconds_per_step with a `none`"):
        leaderboard.main(["--cells", str(cells), "--step-times", str(times),
                      "--out", str(tmp_path)])


def test_params_leave_out_removed_rows_and_seeds(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cells = tmp_path / "cells"
    for row, seed in [("none", 0), ("none", 1), ("pkd", 0), ("pkd", 1), ("cwd", 0)]:
        write_cell(cells, row, seed, 0.1 + seed / 10, 0.5, 1.0)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"compare": {"methods": {"none": {}, "pkd": {}},
                                                  "seeds": [0]}}))
    assert leaderboard.main(["--cells", str(cells), "--params", str(params),
                             "--out", str(tmp_path)]) == 0
    board = json.loads((tmp_path / "leaderboard.json").read_text())
    assert set(board["methods"]) == {"none", "pkd"}
    assert all(row["seeds"] == [0] for row in board["methods"].values())


def test_the_best_row_is_one_with_every_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A row with one lucky finished seed does not lead the board (every other row would be a
    single difference without an interval); cells of different comparisons are named; a
    teacher metrics file asked for by name must exist."""
    monkeypatch.chdir(tmp_path)
    cells = tmp_path / "cells"
    for seed, ap in enumerate([0.40, 0.38, 0.42]):
        write_cell(cells, "a", seed, ap, 0.5, 1.0)
        write_cell(cells, "none", seed, ap - 0.2, 0.5, 1.0)
    write_cell(cells, "lucky", 2, 0.45, 0.5, 1.0)
    cost = cells / "lucky-s2" / "cost.json"
    cost.write_text(json.dumps({**json.loads(cost.read_text()), "compare_id": "other"}))
    for seed in range(3):
        cost = cells / f"a-s{seed}" / "cost.json"
        cost.write_text(json.dumps({**json.loads(cost.read_text()), "compare_id": "first"}))
    assert leaderboard.main(["--cells", str(cells), "--out", str(tmp_path)]) == 0
    board = json.loads((tmp_path / "leaderboard.json").read_text())
    assert board["methods"]["a"]["vs_top"] is None  # a leads, though lucky's mean is higher
    assert board["methods"]["none"]["vs_top"]["ci95"][1] == pytest.approx(-20.0)
    assert board["methods"]["lucky"]["vs_top"]["per_seed"] == {"2": pytest.approx(3.0)}
    assert board["compare_ids"] == {"first": 3, "other": 1}
    assert "The cells come from 2 comparisons (compare_id: cells first: 3, other: 1)" in (
        tmp_path / "leaderboard.md").read_text()
    assert "warning: cells from 2 comparisons" in capsys.readouterr().out
    argv = ["--cells", str(cells), "--teacher-metrics", "nowhere.json", "--out", str(tmp_path)]
    with pytest.raises(UserError, match="nowhere.json: file not found"):
        leaderboard.main(argv)


def test_a_tie_reads_dash(tmp_path: Path) -> None:
    cells = tmp_path / "cells"
    write_cell(cells, "none", 0, 0.30, 0.5, 1.0)
    write_cell(cells, "cwd", 0, 0.32, 0.5, 1.0)
    summary = board_lib.summarise(board_lib.read_cells(cells), {"AP": 0.30})
    assert summary["methods"]["cwd"]["gap_closed"] is None
    cwd_line = next(line for line in board_lib.markdown(summary).splitlines()
                    if line.startswith("| cwd |"))
    assert cwd_line.split(" | ")[10] == "+2.0"  # gain
    assert cwd_line.split(" | ")[11] == "-"  # the gap column reads "-", not 0%


def test_a_size_without_ground_truth_reads_dash(tmp_path: Path,
                                               saved_figures: dict[str, Any]) -> None:
    """pycocotools writes -1 for a size with no ground-truth object (here: no large ones): the
    board prints "-" there and leaves the bar out, not -100 points."""
    cells = tmp_path / "cells"
    for row, ap in (("none", 0.30), ("cwd", 0.32)):
        for seed in (0, 1):
            write_cell(cells, row, seed, ap, 0.5, 1.0)
            metrics = cells / f"{row}-s{seed}" / "metrics.json"
            metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "APl": -1.0}))
    summary = board_lib.summarise(board_lib.read_cells(cells), {"AP": 0.40})
    assert summary["methods"]["cwd"]["mean"]["APl"] is None
    assert summary["methods"]["cwd"]["mean"]["APm"] == pytest.approx(32.0)
    cwd_line = next(line for line in board_lib.markdown(summary).splitlines()
                    if line.startswith("| cwd |"))
    assert cwd_line.split(" | ")[6:10] == ["42.0", "16.0", "32.0", "-"]  # AP50, APs, APm, APl
    board_lib.plot(summary, tmp_path / "board.png")
    sizes = saved_figures["board.png"].axes[1]
    heights = [bar.get_height() for bar in sizes.patches]
    assert len(heights) == 6 and sum(h != h for h in heights) == 2  # the two APl bars: NaN


def test_cell_params(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "student": {"train": {"epochs": 8, "warmup_steps": 300}},
        "distill": {"w_pr": 0.5, "instance": {"tau": 2.0, "topk": 3}},
        "compare": {"epochs": 2, "methods": {
            "fgd": {}, "drkd_ins": {"method": "drkd", "w_pr": 0, "instance": {"tau": 0.1}}}},
        "tracking": {"enabled": True}}))
    cell = cell_params(str(params), "fgd", 2)
    assert cell["seed"] == 2
    # Only what FGD reads: a change to w_pr must not rerun it (nor reach it).
    assert cell["distill"] == {"method": "fgd", "fgd": to_dict(FgdConfig())}
    train = cell["student"]["train"]
    assert (train["epochs"], train["warmup_steps"]) == (2, 75)
    assert cell["tracking"]["enabled"] is False  # the cell itself is the MLflow run
    variant = cell_params(str(params), "drkd_ins", 0)["distill"]
    assert (variant["method"], variant["w_pr"]) == ("drkd", 0)
    assert variant["instance"]["tau"] == 0.1 and variant["instance"]["topk"] == 3  # merged
    assert "fgd" not in variant and "w_mimic" not in variant
    assert load_params(params).distill.w_pr == 0.5  # the cell's file is params.yaml's own

    with pytest.raises(UserError, match="no row 'pkd'"):
        cell_params(str(params), "pkd", 0)


def test_a_combination_row_is_a_cell_beside_the_baseline(tmp_path: Path) -> None:
    """A row adding another method's terms (`plus`) trains as a cell when the table also has
    the baseline `none` (which cannot take `plus`)."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"compare": {"methods": {
        "none": {}, "mgd_ir": {"method": "mgd", "plus": ["drkd"], "w_pr": 0, "w_ins": 0}}}}))
    distill = cell_params(str(params), "mgd_ir", 0)["distill"]
    assert (distill["method"], distill["plus"], distill["w_pr"]) == ("mgd", ["drkd"], 0)
    assert cell_params(str(params), "none", 0)["distill"] == {"method": "none"}
    # DRKD's modules are saved wherever they train: as the method or in `plus`.
    assert trains_drkd_modules(distill) and trains_drkd_modules({"method": "drkd"})
    assert not trains_drkd_modules({"method": "mgd"})


def test_init_student_is_part_of_a_row_only_when_on(tmp_path: Path) -> None:
    """A row that starts its student from the teacher's neck and head trains with it; the
    rows without it keep their settings (and their cells stay cached) as before it existed."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"compare": {"methods": {
        "mgd": {}, "mgd_init": {"method": "mgd", "init_student": True}}}}))
    assert cell_params(str(params), "mgd_init", 0)["distill"]["init_student"] is True
    assert "init_student" not in cell_params(str(params), "mgd", 0)["distill"]
    # On for every row: the baseline, which trains without a teacher, is left as it was.
    params.write_text(yaml.safe_dump({"distill": {"init_student": True}, "compare": {
        "methods": {"none": {}, "mgd": {}}}}))
    assert cell_params(str(params), "none", 0)["distill"] == {"method": "none"}
    assert cell_params(str(params), "mgd", 0)["distill"]["init_student"] is True


def test_rows_files_hold_what_each_cell_trains_with(tmp_path: Path) -> None:
    """`rows` writes ROW.json per row (each cell's DVC dependency): the cell's own `distill`;
    a change to one method's settings changes only its rows' files; 0 and 0.0 are one value."""
    params = tmp_path / "params.yaml"

    def rows(distill: dict, methods: dict) -> dict[str, str]:
        params.write_text(yaml.safe_dump({"distill": distill, "compare": {"methods": methods}}))
        assert compare.main(["rows", "--params", str(params), "--out", str(tmp_path / "r")]) == 0
        return {f.stem: f.read_text() for f in sorted((tmp_path / "r").iterdir())}

    methods = {"none": {}, "mimic": {}, "pkd": {}, "drkd": {}, "ins": {"method": "drkd", "w_pr": 0}}
    before = rows({}, methods)
    assert set(before) == set(methods)
    assert json.loads(before["none"]) == {"method": "none"}
    assert json.loads(before["ins"]) == cell_params(str(params), "ins", 0)["distill"]
    after = rows({"pkd": {"weight": 3.0}, "w_pr": 0.5}, {**methods, "ins": {
        "method": "drkd", "w_pr": 0.0}})
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed == ["drkd", "pkd"]  # not none, mimic, nor ins (w_pr 0 either way)


def test_a_stale_row_file_stops_the_cell(tmp_path: Path) -> None:
    """A cell run alone (`dvc repro -s`) after a params edit, before `rows`: its dependency
    would not say what it trains with, so it refuses, before any training."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"compare": {"methods": {"pkd": {}}}}))
    assert compare.main(["rows", "--params", str(params), "--out", str(tmp_path / "r")]) == 0
    params.write_text(yaml.safe_dump({"distill": {"pkd": {"weight": 3.0}},
                                      "compare": {"methods": {"pkd": {}}}}))

    with pytest.raises(UserError, match=r"pkd\.json: stale, not row 'pkd'"):
        compare.main(["cell", "pkd", "0", "--params", str(params), "--out", str(tmp_path / "c"),
                      "--row-file", str(tmp_path / "r" / "pkd.json")])
    assert not (tmp_path / "c").exists()


def test_one_seed_has_no_spread(tmp_path: Path) -> None:
    cells = tmp_path / "cells"
    write_cell(cells, "none", 0, 0.10, 0.5, 1.0)
    write_cell(cells, "none", 1, 0.12, 0.5, 1.0)
    write_cell(cells, "pkd", 0, 0.20, 0.5, 1.0)
    summary = board_lib.summarise(board_lib.read_cells(cells), None)
    assert summary["methods"]["pkd"]["spread"] is None
    assert summary["methods"]["none"]["spread"] == pytest.approx(2.0)
    assert "| pkd | 1 | **20.0** | 20.0 | - |" in board_lib.markdown(summary)


def test_gain_and_gap_closed_count_the_seeds_both_rows_ran(tmp_path: Path) -> None:
    """A board of unfinished cells: the baseline has seeds 0-2 (30, 32, 34), drkd only seed 0
    (31). Its gain is +1 on the seed both ran, not -1 (31 against the baseline's 3-seed mean)."""
    cells = tmp_path / "cells"
    for seed, ap in enumerate((0.30, 0.32, 0.34)):
        write_cell(cells, "none", seed, ap, 0.5, 1.0)
    write_cell(cells, "drkd", 0, 0.31, 0.5, 1.0)
    summary = board_lib.summarise(board_lib.read_cells(cells), {"AP": 0.40})
    drkd = summary["methods"]["drkd"]
    assert drkd["gain"] == pytest.approx(1.0)
    assert drkd["gap_closed"] == pytest.approx(1.0 / 10.0)  # teacher 40 vs the baseline's 30


@pytest.mark.parametrize("rows, error", [
    ({"x": {"w_pr": 0}}, "compare.methods.x: not a method name"),
    ({"a-b": {}}, "compare.methods.a-b: a row name is letters"),
    ({"v": {"method": "drkd", "w_prr": 1}}, "compare.methods.v.w_prr: unknown key"),
    ({"v": {"method": "drkd", "instance": {"similarity": "cos"}}},
     "compare.methods.v.instance.similarity: expected one of"),
    (["none", "drkd"], "compare.methods: expected a mapping")])
def test_bad_rows_are_one_line_errors(rows: object, error: str) -> None:
    from drkd.config import ConfigError, parse_params

    with pytest.raises(ConfigError, match=error.replace(".", r"\.")):
        parse_params({"compare": {"methods": rows}})


def test_variant_rows_are_listed_with_their_overrides(tmp_path: Path) -> None:
    cells = tmp_path / "cells"
    write_cell(cells, "none", 0, 0.10, 0.5, 1.0)
    write_cell(cells, "drkd_ins", 0, 0.20, 0.6, 1.0, "drkd", {"method": "drkd", "w_pr": 0})
    summary = board_lib.summarise(board_lib.read_cells(cells), {"AP": 0.40})
    assert summary["methods"]["drkd_ins"]["method"] == "drkd"
    assert summary["methods"]["drkd_ins"]["gain"] == pytest.approx(10.0)
    table = board_lib.markdown(summary)
    assert "| drkd_ins |" in table and "- drkd_ins: drkd with w_pr=0" in table


def test_no_cells_is_one_line(tmp_path: Path) -> None:

    with pytest.raises(UserError, match="no finished cell"):
        leaderboard.main(["--cells", str(tmp_path), "--out", str(tmp_path)])


def test_a_failed_training_ends_the_cell_with_its_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        launch("python", "stages.train", ["no-such-model"])  # argparse: exit code 2
    assert ended.value.code == 2
    assert "error: stages.train under `python` exited with status 2" in capsys.readouterr().err


def test_a_terminated_cell_terminates_its_training(tmp_path: Path) -> None:
    """A SIGTERM to the cell (a DVC queue kill) reaches the training it launched: no training
    left running on its own after its cell ended."""
    (tmp_path / "sleeper.py").write_text(
        "import os, pathlib, time\n"
        "pathlib.Path('pid').write_text(str(os.getpid()))\n"
        "time.sleep(60)\n")
    cell = subprocess.Popen(
        [sys.executable, "-c",
         "from drkd.compare import launch; launch('python', 'sleeper', [])"],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])})
    deadline = time.monotonic() + 180  # seconds normally; minutes on a loaded machine
    while not (tmp_path / "pid").exists():
        assert time.monotonic() < deadline, "the training never started"
        time.sleep(0.1)
    training = int((tmp_path / "pid").read_text())
    cell.terminate()
    _, err = cell.communicate(timeout=30)
    assert cell.returncode == 1
    assert "error: sleeper under `python` was killed by signal 15" in err
    with pytest.raises(ProcessLookupError):
        os.kill(training, 0)  # gone (and reaped by the cell)


@pytest.mark.slow
def test_two_cells_at_once_each_with_its_share_of_the_cores(tmp_path: Path) -> None:
    """Cells run side by side (as `dvc queue start -j 2` runs them, or two machines would) with
    one thread each: both finish with their records, the thread count in each, and one MLflow
    run each in the shared store."""
    from conftest import TINY_DATA, toy_params, toy_teacher
    from drkd.config import DataConfig
    from drkd.data.prepare import prepare

    data = tmp_path / "data"
    prepare(DataConfig(source="synthetic", synthetic=TINY_DATA), seed=0, out_dir=data)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = toy_params(tmp_path / "params.yaml", compare={"methods": {"none": {}, "pkd": {}}},
                        tracking={"enabled": True, "uri": store, "system_metrics": False})
    teacher = toy_teacher(data, tmp_path / "teacher.pt")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cells = [subprocess.Popen(
        [sys.executable, "-m", "stages.compare", "cell", row, "0", "--params", str(params),
         "--out", str(tmp_path / "cells" / f"{row}-s0"), "--data", str(data),
         "--teacher", str(teacher)], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        for row in ("none", "pkd")]
    errors = [cell.communicate(timeout=600)[1] for cell in cells]
    assert [cell.returncode for cell in cells] == [0, 0], [e[-2000:] for e in errors]
    for row in ("none", "pkd"):
        cost = json.loads((tmp_path / "cells" / f"{row}-s0" / "cost.json").read_text())
        assert cost["threads"] == 1 and cost["row"] == row
    import mlflow

    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["drkd"], output_format="list")
    assert sorted(r.data.tags["row"] for r in runs if "row" in r.data.tags) == ["none", "pkd"]
    assert all(r.data.metrics["threads"] == 1 for r in runs if "row" in r.data.tags)
    from drkd.tracking import data_hash  # the data the pipeline's stages are tagged with
    expected = data_hash(data)
    assert {r.data.tags["data_hash"] for r in runs if "row" in r.data.tags} == {expected}
