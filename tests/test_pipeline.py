"""End to end: real `dvc repro` of the smoke preset in a temporary copy of the repo, real MLflow."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from ruamel.yaml import YAML

from drkd.config import load_params

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
COPY = [
    "drkd",
    "stages",
    "presets",
    "dvc.yaml",
    "compare/dvc.yaml",  # not the lock or cells: this checkout's comparison is not the test's
    "params.yaml",
    ".dvcignore",
    ".gitignore",
    "pyproject.toml",
]


def copy_files(source: Path, names: list[str], dest: Path) -> None:
    """``names`` (files or folders) from ``source`` into ``dest``, without bytecode."""
    for name in names:
        src = source / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / name)


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    repo = tmp_path_factory.mktemp("repo")
    copy_files(ROOT, COPY, repo)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env["DRKD_PIPELINE_ID"] = "e2e-test"
    env.update(
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    _run(["git", "init", "-q"], repo, env)
    _run(["dvc", "init", "-q"], repo, env)
    # The smoke preset as the README runs it (`--exp-run`: `dvc exp run -S ...`), tracking on
    # and, since 1-epoch models score low, every detection kept.
    preset = yaml.safe_load((repo / "presets" / "smoke.yaml").read_text())
    preset["tracking"] = {"enabled": True}
    for model in ("teacher", "student"):
        preset[model]["model"]["score_thresh"] = 0.0
    (repo / "presets" / "e2e.yaml").write_text(yaml.safe_dump(preset))
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)
    out = _run([sys.executable, "-m", "stages.preset", "presets/e2e.yaml", "--exp-run"], repo, env)
    assert "Running stage 'distill'" in out
    assert load_params(repo / "params.yaml").tracking.enabled  # the workspace holds the run
    return repo, env


def test_repro_writes_metrics_reports_and_mlflow_runs(repo: tuple[Path, dict[str, str]]) -> None:
    from drkd.evaluation import coco_metrics

    root, _ = repo
    params = load_params(root / "params.yaml")
    thresh = {"teacher": params.teacher.model.score_thresh,
              "student": params.student.model.score_thresh,
              "student_drkd": params.student.model.score_thresh}
    val_json = root / "data" / "prepared" / "val.json"
    val = json.loads(val_json.read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in val["images"]}
    category_ids = {c["id"] for c in val["categories"]}
    for name in ("teacher", "student", "student_drkd"):
        metrics = json.loads((root / "eval" / name / "metrics.json").read_text())
        for key in KEYS:
            assert -1.0 <= metrics[key] <= 1.0, (name, key)
        assert metrics["parameters"] > 0 and metrics["inference_ms_per_image"] > 0
        headline = json.loads((root / "metrics" / f"{name}.json").read_text())
        assert headline == {k: metrics[k] for k in KEYS}
        # The file is what was scored (its COCO metrics are the metrics written), and every
        # detection in it is valid (score_thresh 0: there are some).
        detections = json.loads((root / "eval" / name / "detections.json").read_text())
        assert detections, name
        scored = coco_metrics(val_json, detections)
        assert {k: metrics[k] for k in scored} == scored, name
        for d in detections:
            assert set(d) == {"image_id", "category_id", "bbox", "score"}, d
            assert d["image_id"] in sizes and d["category_id"] in category_ids, d
            x, y, w, h = d["bbox"]
            width, height = sizes[d["image_id"]]
            assert 0 <= x <= x + w <= width + 0.01 and 0 <= y <= y + h <= height + 0.01, d
            assert thresh[name] <= d["score"] <= 1, d
    summary = json.loads((root / "reports" / "summary.json").read_text())
    assert {"teacher", "student", "student_drkd"} <= set(summary)
    gain = json.loads((root / "metrics" / "gain.json").read_text())
    assert gain["student_drkd"]["gap_closed"] == summary["student_drkd"]["gap_closed"]
    assert "teacher" in (root / "reports" / "summary.md").read_text()
    # The figures are drawn in the stages' processes, out of this test's reach: what they show
    # is checked on the saved figures in test_evaluate_report.py; here they are PNGs.
    for png in ("loss_curves.png", "ap_by_size.png", "detections.png", "pixel_relations.png",
                "instance_relations.png"):
        with Image.open(root / "reports" / "plots" / png) as image:
            assert image.format == "PNG" and min(image.size) > 100, png
    with Image.open(root / "reports" / "plots" / "detections.png") as image:
        assert image.width > image.height  # 2 images (rows) x ground truth + 3 models
    rows = list(csv.DictReader((root / "reports" / "plots" / "ap_by_size.csv").open()))
    assert {r["model"] for r in rows} == {"teacher", "student", "student_drkd"}
    drift = json.loads((root / "reports" / "plots" / "glore_drift.json").read_text())
    assert {len(v) for v in drift.values()} == {5} and set(drift) == {"teacher", "student"}
    assert all(math.isfinite(v) and v >= 0 for side in drift.values() for v in side)

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["drkd"], output_format="list")
    stages = {r.data.tags["dvc_stage"]: r for r in runs}
    expected = {"prepare", "train_teacher", "train_student", "distill", "evaluate@teacher",
                "evaluate@student", "evaluate@student_drkd", "report"}
    assert expected <= set(stages)
    for run in stages.values():
        assert run.info.status == "FINISHED"
        assert run.data.tags["pipeline_id"] == "e2e-test"
        assert run.data.tags["git_commit"] not in ("", "unknown")
    assert "loss" in stages["train_teacher"].data.metrics
    assert {"loss_pr", "loss_ir", "loss_ins"} <= set(stages["distill"].data.metrics)
    assert stages["evaluate@teacher"].data.metrics["AP"] >= 0
    # Each evaluation's metrics belong to the model its training run logged; distill read the
    # teacher's.
    client = mlflow.MlflowClient()
    trained = {}
    for stage, name in (("train_teacher", "teacher"), ("train_student", "student"),
                        ("distill", "student_drkd")):
        (output,) = stages[stage].outputs.model_outputs
        trained[name] = output.model_id
        evaluated = client.get_run(stages[f"evaluate@{name}"].info.run_id)
        assert [m.model_id for m in evaluated.inputs.model_inputs] == [output.model_id]
        assert "AP" in {m.key for m in client.get_logged_model(output.model_id).metrics}
    distill = client.get_run(stages["distill"].info.run_id)
    assert [m.model_id for m in distill.inputs.model_inputs] == [trained["teacher"]]


def test_second_repro_is_a_no_op_and_student_change_reruns_only_its_branch(
    repo: tuple[Path, dict[str, str]],
) -> None:
    root, env = repo
    out = _run(["dvc", "repro"], root, env)
    assert "Running stage" not in out
    params = (root / "params.yaml").read_text()
    marker = "student:\n"
    head, tail = params.split(marker, 1)
    (root / "params.yaml").write_text(head + marker + tail.replace("lr: 0.001", "lr: 0.002", 1))
    out = _run(["dvc", "repro"], root, env)
    assert "Running stage 'train_student'" in out
    assert "Running stage 'distill'" in out  # the same student recipe
    assert "Running stage 'evaluate@student'" in out
    assert "Running stage 'report'" in out
    for stage in ("prepare", "train_teacher", "evaluate@teacher"):
        assert f"Running stage '{stage}'" not in out
    # `dvc exp run -S` is the override mechanism; a distill param reruns only what follows it.
    out = _run(["dvc", "exp", "run", "-S", "distill.w_ir=0.02"], root, env)
    assert "Running stage 'distill'" in out and "Running stage 'report'" in out
    for stage in ("train_teacher", "train_student", "evaluate@student"):
        assert f"Running stage '{stage}'" not in out
    # A setting the method does not read (PKD's weight, under DRKD) reruns only the cheap
    # distill_settings stage, whose file stays the same.
    out = _run(["dvc", "exp", "run", "-S", "distill.pkd.weight=4.0"], root, env)
    assert "Running stage 'distill_settings'" in out
    assert "Running stage 'distill'" not in out and "Running stage 'report'" not in out


def test_dvc_metrics_and_plots_read_the_outputs(repo: tuple[Path, dict[str, str]]) -> None:
    root, env = repo
    proc = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    (workspace,) = json.loads(proc.stdout).values()
    # compare/leaderboard.json exists only once `make compare` has run (a later test).
    files = {k: v for k, v in workspace["data"].items() if k != "compare/leaderboard.json"}
    assert set(files) == {"metrics/teacher.json", "metrics/student.json",
                          "metrics/student_drkd.json", "metrics/gain.json"}
    for name in ("teacher", "student", "student_drkd"):
        assert set(files[f"metrics/{name}.json"]["data"]) == set(KEYS)  # the headline alone
    # gap_closed is null on a tie (these untrained models all score ~0), and DVC drops nulls.
    assert set(files["metrics/gain.json"]["data"]["student_drkd"]) <= {"AP_gain", "gap_closed"}
    plots = _run(["dvc", "plots", "show", "--json"], root, env)
    assert "ap_by_size" in plots


def set_compare(root: Path, rows: dict[str, dict], seeds: list[int]) -> None:
    yaml = YAML()
    params = yaml.load(root / "params.yaml")
    params["compare"]["methods"], params["compare"]["seeds"] = rows, seeds
    yaml.dump(params, root / "params.yaml")


def test_compare_runs_each_cell_once(repo: tuple[Path, dict[str, str]]) -> None:
    """`make compare` on the smoke preset: 2 methods x 2 seeds, a no-op rerun, a new seed
    that runs only its cells, a change to `distill` that makes stale only the cells of the rows
    that read it, and a variant row that runs only its own (and goes stale when edited); each
    cell an MLflow run tagged row, method, seed and compare_id. Staleness is read from `dvc
    status` after the rows stage, not by training the cells again: what runs is tested above."""
    root, env = repo
    set_compare(root, {"none": {}, "pkd": {}}, [0, 1])
    out = _run(["dvc", "repro", "compare/dvc.yaml"], root, env)
    assert out.count("Running stage 'compare/dvc.yaml:cell@") == 4
    assert "Running stage 'compare/dvc.yaml:cell@pkd-1'" in out  # the runs' dvc_stage, below
    board = json.loads((root / "compare" / "leaderboard.json").read_text())
    assert set(board["methods"]) == {"none", "pkd"}
    for row in board["methods"].values():
        assert row["seeds"] == [0, 1] and len(row["per_seed"]) == 2
        assert row["seconds_per_step"] > 0 and row["peak_memory_mb"] > 0
    assert board["methods"]["none"]["step_time_vs_baseline"] == 1.0
    assert "pkd" in (root / "compare" / "leaderboard.md").read_text()
    with Image.open(root / "compare" / "leaderboard.png") as image:  # drawn: test_compare.py
        assert image.format == "PNG" and min(image.size) > 100
    used = json.loads((root / "compare" / "cells" / "pkd-s1" / "params.yaml").read_text())
    assert used["seed"] == 1 and used["distill"]["method"] == "pkd"

    assert "Running stage" not in _run(["dvc", "repro", "compare/dvc.yaml"], root, env)
    cost = json.loads((root / "compare" / "cells" / "pkd-s1" / "cost.json").read_text())
    with (root / "compare" / "cells" / "pkd-s1" / "history.csv").open() as fh:
        last = list(csv.DictReader(fh))[-1]
    assert cost["steps"] == int(last["step"]) > 0
    assert cost["train_seconds"] == pytest.approx(float(last["seconds"]), abs=0.01)

    set_compare(root, {"none": {}, "pkd": {}}, [0, 1, 2])
    out = _run(["dvc", "repro", "compare/dvc.yaml"], root, env)
    ran = sorted(line.split("'")[1] for line in out.splitlines() if "Running stage" in line)
    assert ran == ["compare/dvc.yaml:cell@none-2", "compare/dvc.yaml:cell@pkd-2",
                   "compare/dvc.yaml:leaderboard"]

    def stale() -> set[str]:
        """The compare stages `dvc repro` would run now (a stage line of `dvc status`)."""
        out = _run(["dvc", "status", "compare/dvc.yaml"], root, env)
        return {line.rstrip(":") for line in out.splitlines()
                if line.startswith("compare/dvc.yaml:") and line.endswith(":")}

    # A change to `distill` makes stale only the cells of the rows that read what changed:
    # DRKD's w_pr no cell here, PKD's weight the pkd cells (not `none`).
    def set_distill(key: str, value: float) -> tuple[list[str], set[str]]:
        """Set distill.KEY, rerun the rows stage: (the stages it ran, the stages now stale)."""
        yaml = YAML()
        params = yaml.load(root / "params.yaml")
        section = params["distill"]
        *path, last = key.split(".")
        for part in path:
            section = section.setdefault(part, {})
        section[last] = value
        yaml.dump(params, root / "params.yaml")
        out = _run(["dvc", "repro", "-s", "compare/dvc.yaml:rows"], root, env)
        ran = sorted(line.split("'")[1] for line in out.splitlines() if "Running stage" in line)
        return ran, stale()

    assert stale() == set()
    rows_stage = ["compare/dvc.yaml:rows"]
    assert set_distill("w_pr", 0.5) == (rows_stage, set())
    pkd_weight = YAML().load(root / "params.yaml")["distill"]["pkd"]["weight"]
    pkd_cells = {f"compare/dvc.yaml:cell@pkd-{seed}" for seed in range(3)}
    assert set_distill("pkd.weight", 3.0) == (rows_stage, pkd_cells)
    # Back as it was: nothing stale (DVC may restore the rows from its run cache, not rerun them).
    assert set_distill("pkd.weight", pkd_weight)[1] == set()

    def rerun_with(variant: dict) -> list[str]:
        set_compare(root, {"none": {}, "pkd": {}, "pkd_x3": variant}, [0, 1, 2])
        out = _run(["dvc", "repro", "-s", "compare/dvc.yaml:rows", "compare/dvc.yaml:cell@pkd_x3-0",
                    "compare/dvc.yaml:leaderboard"], root, env)
        return sorted(line.split("'")[1] for line in out.splitlines() if "Running stage" in line)

    # One seed of a variant row (the rest of its matrix is not asked for): its cell only.
    assert rerun_with({"method": "pkd", "pkd": {"weight": 30.0}}) == [
        "compare/dvc.yaml:cell@pkd_x3-0", "compare/dvc.yaml:leaderboard", "compare/dvc.yaml:rows"]
    used = json.loads((root / "compare" / "cells" / "pkd_x3-s0" / "params.yaml").read_text())
    assert used["distill"]["method"] == "pkd" and used["distill"]["pkd"]["weight"] == 30.0
    board = json.loads((root / "compare" / "leaderboard.json").read_text())
    assert board["methods"]["pkd_x3"]["method"] == "pkd"
    assert "- pkd_x3: pkd with pkd.weight=30.0" in (root / "compare" / "leaderboard.md").read_text()
    # Untouched rows stay fresh; the variant's seeds 1 and 2 were never run.
    never_run = {"compare/dvc.yaml:cell@pkd_x3-1", "compare/dvc.yaml:cell@pkd_x3-2"}
    now = stale()
    assert never_run <= now and "compare/dvc.yaml:cell@pkd_x3-0" not in now
    assert not {s for s in now if "cell@pkd-" in s or "cell@none-" in s}
    # Edited, the variant's cell goes stale (its rows file changed), and nothing else.
    set_compare(root, {"none": {}, "pkd": {}, "pkd_x3": {"method": "pkd", "pkd": {"weight": 20.0}}},
                [0, 1, 2])
    _run(["dvc", "repro", "-s", "compare/dvc.yaml:rows"], root, env)
    assert stale() - never_run == {"compare/dvc.yaml:cell@pkd_x3-0", "compare/dvc.yaml:leaderboard"}

    # A removed row leaves the board (DVC keeps its folder; the board reads params' rows).
    set_compare(root, {"none": {}, "pkd": {}}, [0, 1, 2])
    out = _run(["dvc", "repro", "compare/dvc.yaml"], root, env)
    assert "Running stage 'compare/dvc.yaml:cell@" not in out
    board = json.loads((root / "compare" / "leaderboard.json").read_text())
    assert set(board["methods"]) == {"none", "pkd"}
    assert (root / "compare" / "cells" / "pkd_x3-s0").is_dir()

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["drkd"], output_format="list",
                              filter_string="tags.row = 'pkd'")
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1", "2"]
    assert {r.data.tags["method"] for r in runs} == {"pkd"}
    assert sorted(r.data.tags["dvc_stage"] for r in runs) == ["cell@pkd-0", "cell@pkd-1",
                                                                "cell@pkd-2"]
    cells = [r for r in mlflow.search_runs(experiment_names=["drkd"], output_format="list")
             if "row" in r.data.tags]
    assert {r.data.tags["row"] for r in cells} == {"none", "pkd", "pkd_x3"}
    assert len({r.data.tags["compare_id"] for r in cells}) == 1  # one comparison, every row
    assert all("AP" in r.data.metrics for r in runs)
    for r in runs:  # the training steps' time: above 0, below the cell's setup + train + eval
        wall = (r.info.end_time - r.info.start_time) / 1000
        assert 0 < r.data.metrics["train_seconds"] < wall, (r.data.metrics, wall)


def test_cells_run_elsewhere_are_restored_not_retrained(
        repo: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """Compare cells across machines, as docs/compare-and-tune.md says: cells run on one
    machine and pushed with their runs (`dvc push --run-cache`) are restored on another, a
    clone of the same commit, by `dvc fetch --run-cache` and `dvc repro --pull`, not trained
    again; the board is the same."""
    root, env = repo
    _run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], root, env)
    _run(["dvc", "push", "--run-cache"], root, env)
    board = tmp_path / "board"
    copy_files(root, [*COPY, "dvc.lock"], board)  # the commit: not compare/dvc.lock (local)
    _run(["git", "init", "-q"], board, env)
    _run(["dvc", "init", "-q"], board, env)
    _run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], board, env)
    _run(["dvc", "pull", "models/teacher.pt", "data/prepared"], board, env)
    _run(["dvc", "fetch", "--run-cache"], board, env)
    out = _run(["dvc", "repro", "--pull", "compare/dvc.yaml"], board, env)
    assert "Running stage 'compare/dvc.yaml:cell@" not in out, out[-3000:]
    assert out.count("is cached - skipping run") >= 6  # the rows stage and every cell
    boards = [json.loads((r / "compare" / "leaderboard.json").read_text()) for r in (root, board)]
    assert boards[0] == boards[1]
