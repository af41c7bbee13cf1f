"""COCO metrics sanity, the evaluate stage end to end, and the report stage (its summary, gain
table and plots, the relation plots included). The toy checkpoint is made to detect (its
classification bias raised), so the detection checks run over real detections."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from conftest import (
    STAT_KEYS,
    detecting,
    dvc_stages,
    fake_metrics,
    toy_model,
    toy_params,
    write_relation_models,
)
from drkd import cli, plots
from drkd import report as rep
from drkd.checkpoint import load_detector, model_checkpoint, save_atomic
from drkd.config import UserError
from drkd.data.coco import CocoDetection
from drkd.data.transforms import eval_transforms
from drkd.evaluation import coco_metrics, predict
from drkd.models import build_detector, count_parameters
from stages import evaluate, report

ROOT = Path(__file__).resolve().parents[1]

KEYS = STAT_KEYS


def gt_as_detections(val_json: Path, shift: float = 0.0) -> list[dict[str, Any]]:
    coco = json.loads(val_json.read_text())
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
             "bbox": [a["bbox"][0] + shift * a["bbox"][2], a["bbox"][1], *a["bbox"][2:]]}
            for a in coco["annotations"] if not a.get("iscrowd", 0)]


def write_params(path: Path, tracking: bool = False, **evaluate: object) -> Path:
    return toy_params(path, tracking={"enabled": tracking},
                      evaluate={"batch_size": 2, "timing_images": 2, **evaluate})


def test_ground_truth_scores_perfect(tiny_data: Path) -> None:
    metrics = coco_metrics(tiny_data / "val.json", gt_as_detections(tiny_data / "val.json"))
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["AP50"] == pytest.approx(1.0)


def test_no_detections_score_as_cocoeval_scores_a_miss(tmp_path: Path) -> None:
    """An empty detection list (which pycocotools' loadRes refuses) gets COCOeval's own
    numbers: those of one detection that matches nothing. A 32x32 box is "small" (COCO's
    ranges include their ends), and a class or size without ground truth is -1."""
    gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 32, 32],
                           "area": 1024, "iscrowd": 0}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    miss = [{"image_id": 1, "category_id": 1, "bbox": [60, 60, 10, 10], "score": 0.9}]
    empty = coco_metrics(path, [])
    assert empty == coco_metrics(path, miss)
    assert empty["APs"] == 0.0 and empty["APm"] == 0.0 and empty["APl"] == -1.0
    assert empty["per_class_AP"] == {"a": 0.0, "b": -1.0}


def test_predict_leaves_the_global_rng_alone(tiny_data: Path) -> None:
    """Evaluating between training epochs must not change training's random stream."""
    data = CocoDetection(tiny_data / "val.json", eval_transforms())
    model = build_detector(toy_model(), data.num_classes)
    state = torch.get_rng_state()
    predict(model, data, 2, torch.device("cpu"), progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_shifted_boxes_score_lower(tiny_data: Path) -> None:
    metrics = coco_metrics(tiny_data / "val.json", gt_as_detections(tiny_data / "val.json", 0.4))
    assert 0 <= metrics["AP"] < 0.5


@pytest.fixture(scope="module")
def checkpoint(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    dataset = CocoDetection(tiny_data / "train.json")
    # fpn_channels=24: GroupNorm keeps >= 2 channels per group, so batch-1 timing works on the
    # 1x1 P7 map of a 64 px image (the default 16 gives 1 per group and raises, see report).
    cfg = toy_model(fpn_channels=24)
    model = detecting(build_detector(cfg, dataset.num_classes))
    path = tmp_path_factory.mktemp("models") / "toy.pt"
    save_atomic(model_checkpoint(model, cfg, dataset.category_ids, dataset.category_names), path)
    return path, count_parameters(model)


def run_evaluate(name: str, ckpt: Path, data: Path, out: Path, params: Path) -> int:
    """As dvc.yaml runs it: all metrics beside the detections, the headline in metrics/."""
    return evaluate.main([name, "--checkpoint", str(ckpt), "--data", str(data),
                          "--metrics", str(out / "eval" / name / "metrics.json"),
                          "--headline", str(out / "metrics" / f"{name}.json"),
                          "--detections", str(out / "eval" / name / "detections.json"),
                          "--params", str(params)])


@pytest.fixture(scope="module")
def evaluated(tiny_data: Path, checkpoint: tuple[Path, int],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same detecting toy checkpoint evaluated as `teacher` and `student`, plus two fake
    histories."""
    out = tmp_path_factory.mktemp("run")
    params = write_params(out / "params.yaml", num_vis_images=2, vis_score_thresh=0.0)
    for name in ("teacher", "student"):
        assert run_evaluate(name, checkpoint[0], tiny_data, out, params) == 0
        with (out / f"train_{name}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["step", "classification", "bbox_regression", "loss", "lr"])
            for step in range(1, 6):
                writer.writerow([step, 1 / step, 0.5 / step, 1.5 / step, 1e-3])
    return out


def test_evaluate_writes_metrics_and_detections(evaluated: Path, tiny_data: Path,
                                                checkpoint: tuple[Path, int]) -> None:
    metrics = json.loads((evaluated / "eval" / "teacher" / "metrics.json").read_text())
    assert set(metrics) == {*KEYS, "per_class_AP", "parameters", "inference_ms_per_image"}
    headline = json.loads((evaluated / "metrics" / "teacher.json").read_text())
    assert headline == {k: metrics[k] for k in KEYS}
    for value in [*(metrics[k] for k in KEYS), *metrics["per_class_AP"].values()]:
        assert value == -1 or 0 <= value <= 1
    assert metrics["parameters"] == checkpoint[1]
    assert metrics["inference_ms_per_image"] > 0
    # The detections are the checkpoint's on val, as scored: predicted again here, they are the
    # same list, and COCO metrics of the file are the metrics written.
    detections = json.loads((evaluated / "eval" / "teacher" / "detections.json").read_text())
    val = CocoDetection(tiny_data / "val.json", eval_transforms())
    model, _ = load_detector(checkpoint[0])
    again, _ = predict(model, val, 2, torch.device("cpu"), progress=False)
    assert detections == again
    assert coco_metrics(tiny_data / "val.json", detections) == {
        k: v for k, v in metrics.items() if k not in ("parameters", "inference_ms_per_image")}
    # Every detection is a valid COCO result: a val image, a real category (never the
    # background slot RetinaNet also scores), a box inside its image, a score above the
    # threshold; at most detections_per_img per image, and each image has some.
    images = {info["id"]: info for info in val.images}
    cfg = toy_model()
    for d in detections:
        assert set(d) == {"image_id", "category_id", "bbox", "score"}, d
        assert d["category_id"] in val.category_ids, d
        x, y, w, h = d["bbox"]
        info = images[d["image_id"]]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0, d
        assert x + w <= info["width"] + 0.01 and y + h <= info["height"] + 0.01, (d, info)
        assert cfg.score_thresh <= d["score"] <= 1, d
    per_image = {i: sum(d["image_id"] == i for d in detections) for i in images}
    assert all(0 < n <= cfg.detections_per_img for n in per_image.values()), per_image
    student = json.loads((evaluated / "eval" / "student" / "detections.json").read_text())
    assert student == detections  # the same checkpoint under another name


def test_report_writes_summary_table_and_plots(evaluated: Path, tiny_data: Path,
                                               saved_figures: dict[str, Any]) -> None:
    plots = evaluated / "reports" / "plots"
    assert report.main([
        "--models", "teacher", "student", "--eval-dir", str(evaluated / "eval"),
        "--data", str(tiny_data),
        "--histories", str(evaluated / "train_teacher.csv"), str(evaluated / "train_student.csv"),
        "--summary", str(evaluated / "summary.json"), "--table", str(evaluated / "summary.md"),
        "--plots-dir", str(plots), "--params", str(evaluated / "params.yaml")]) == 0
    summary = json.loads((evaluated / "summary.json").read_text())
    assert set(summary) == {"teacher", "student"}
    assert "gap_to_first" not in summary["teacher"]
    assert summary["student"]["gap_to_first"]["parameters"] == 0
    table = (evaluated / "summary.md").read_text()
    assert "| metric | teacher | student |" in table and "\n| AP | " in table
    assert sorted(saved_figures) == ["ap_by_size.png", "detections.png", "loss_curves.png"]
    for name in saved_figures:  # no relation plots: no --teacher/--distilled/--modules
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and min(image.size) > 100

    # Loss curves: a panel per history, each term and the total, as in the csv.
    axes = {ax.get_title(): ax for ax in saved_figures["loss_curves.png"].axes if ax.get_title()}
    assert set(axes) == {"teacher", "student"}
    lines = {line.get_label(): line for line in axes["student"].get_lines()}
    assert list(lines) == ["classification", "bbox_regression", "loss (total)"]
    assert list(lines["classification"].get_xdata()) == [1, 2, 3, 4, 5]
    assert list(lines["loss (total)"].get_ydata()) == pytest.approx([1.5 / s for s in range(1, 6)])

    # AP by size: one bar per model and size bucket, its height the metric in points.
    (ax,) = saved_figures["ap_by_size.png"].axes
    assert ax.get_title() == "AP by object size (val)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["teacher", "student"]
    metrics = json.loads((evaluated / "eval" / "teacher" / "metrics.json").read_text())
    expected = [max(100 * metrics[k], 0) for k in rep.SIZE_BUCKETS]
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == pytest.approx(expected * 2)  # teacher's bars, then student's (the same)
    rows = list(csv.DictReader((plots / "ap_by_size.csv").open()))
    assert {r["model"] for r in rows} == {"teacher", "student"}

    # Detections: a row per shown val image; ground truth, then each model's detections drawn.
    figure = saved_figures["detections.png"]
    assert figure.get_suptitle() == "Validation detections (score >= 0)"
    grid = [figure.axes[i:i + 3] for i in range(0, len(figure.axes), 3)]
    assert len(grid) == 2 and all(len(row) == 3 for row in grid)  # num_vis_images: 2
    assert [ax.get_title() for ax in grid[0]] == ["ground truth", "teacher", "student"]
    val = CocoDetection(tiny_data / "val.json")
    assert [row[0].get_ylabel() for row in grid] == [f"image {i['id']}" for i in val.images[:2]]
    for row in grid:
        truth, teacher, student = (ax.get_images()[0].get_array() for ax in row)
        assert (teacher != truth).any()  # its boxes are drawn
        assert (teacher == student).all()  # the same checkpoint, the same boxes


def test_report_single_model_without_histories(evaluated: Path, tiny_data: Path,
                                               saved_figures: dict[str, Any]) -> None:
    assert report.main([
        "--models", "student", "--eval-dir", str(evaluated / "eval"), "--data", str(tiny_data),
        "--summary", str(evaluated / "one.json"), "--table", str(evaluated / "one.md"),
        "--plots-dir", str(evaluated / "one"), "--params", str(evaluated / "params.yaml")]) == 0
    assert list(json.loads((evaluated / "one.json").read_text())) == ["student"]
    assert (evaluated / "one" / "loss_curves.png").is_file()
    (ax,) = saved_figures["loss_curves.png"].axes
    assert [t.get_text() for t in ax.texts] == ["no training histories given"]
    titles = [ax.get_title() for ax in saved_figures["detections.png"].axes[:2]]
    assert titles == ["ground truth", "student"]


def test_report_with_a_teacher_given_trained(evaluated: Path, tiny_data: Path,
                                             saved_figures: dict[str, Any]) -> None:
    """`teacher.train.epochs: 0` (the paper presets: the teacher given trained) writes a
    history of a header alone: the report leaves its loss panel out instead of failing."""
    given = evaluated / "given_teacher.csv"
    given.write_text("step\n")
    assert report.main([
        "--models", "teacher", "student", "--eval-dir", str(evaluated / "eval"),
        "--data", str(tiny_data), "--histories", str(given), str(evaluated / "train_student.csv"),
        "--summary", str(evaluated / "g.json"), "--table", str(evaluated / "g.md"),
        "--plots-dir", str(evaluated / "g"), "--params", str(evaluated / "params.yaml")]) == 0
    titles = {ax.get_title() for ax in saved_figures["loss_curves.png"].axes if ax.get_title()}
    assert titles == {"student"}
    (evaluated / "bad.csv").write_text("epoch,loss\n1,2\n")
    with pytest.raises(UserError, match="bad.csv: not a loss history"):
        rep.read_history(evaluated / "bad.csv")


def test_report_missing_metrics_is_one_line_error(evaluated: Path, tiny_data: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--models", "teacher", "student_drkd", "--eval-dir", str(evaluated / "eval"),
            "--data", str(tiny_data),
            "--summary", str(evaluated / "x.json"), "--table", str(evaluated / "x.md"),
            "--plots-dir", str(evaluated / "x"), "--params", str(evaluated / "params.yaml")]
    assert cli.run(report.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "student_drkd/metrics.json" in err
    assert not (evaluated / "x.json").exists()


def test_two_histories_named_alike_are_refused(evaluated: Path, tiny_data: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Each history's file name titles its loss panel: two alike would leave one panel."""
    other = evaluated / "other"
    other.mkdir(exist_ok=True)
    (other / "train_student.csv").write_text((evaluated / "train_student.csv").read_text())
    argv = ["--models", "teacher", "--eval-dir", str(evaluated / "eval"), "--data",
            str(tiny_data), "--histories", str(evaluated / "train_student.csv"),
            str(other / "train_student.csv"), "--summary", str(evaluated / "y.json"),
            "--table", str(evaluated / "y.md"), "--plots-dir", str(evaluated / "y"),
            "--params", str(evaluated / "params.yaml")]
    assert cli.run(report.main, argv) == 2
    assert "--histories: two files named alike" in capsys.readouterr().err
    assert not (evaluated / "y.json").exists()


def test_evaluate_logs_mlflow_run(tiny_data: Path, checkpoint: tuple[Path, int], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = write_params(tmp_path / "params.yaml", tracking=True, timing_images=0)
    assert run_evaluate("student", checkpoint[0], tiny_data, tmp_path, params) == 0
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["drkd"])
    run = runs[runs["tags.mlflow.runName"] == "evaluate@student"]
    assert len(run) == 1 and run["status"].iloc[0] == "FINISHED"
    ap = json.loads((tmp_path / "metrics" / "student.json").read_text())["AP"]
    assert run["metrics.AP"].iloc[0] == pytest.approx(ap)
    # No training run logged this checkpoint: the evaluate run logs it, so AP still leads to
    # the weights.
    (model,) = mlflow.search_logged_models(experiment_ids=[run["experiment_id"].iloc[0]],
                                           output_format="list")
    assert model.source_run_id == run["run_id"].iloc[0] and model.name == "student"
    assert {m.key: m.value for m in model.metrics}["AP"] == pytest.approx(ap)


# -- three models: the gain of the distilled student ------------------------------------------


def test_summary_gain_and_gap_closed() -> None:
    summary = rep.summarize({"teacher": fake_metrics(0.4, 0.3),
                             "student": fake_metrics(0.2, 0.1),
                             "student_drkd": fake_metrics(0.3),
                             "student_mimic": fake_metrics(0.15)})
    assert "gain_over_student" not in summary["student"] and "gap_closed" not in summary["student"]
    drkd = summary["student_drkd"]
    assert drkd["gap_closed"] == 0.5
    assert drkd["gain_over_student"]["AP"] == pytest.approx(0.1)
    assert drkd["gain_over_student"]["APm"] == pytest.approx(0.1)
    assert drkd["gain_over_student"]["APs"] is None  # no small GT for student_drkd (-1)
    assert drkd["gain_over_student"]["parameters"] == 0
    assert drkd["gap_to_first"]["AP"] == pytest.approx(-0.1)
    assert summary["student_mimic"]["gap_closed"] == pytest.approx(-0.25)
    numbers = rep.summary_numbers(summary)
    assert numbers["student_drkd.gap_closed"] == 0.5
    assert numbers["student_drkd.gain_over_student.AP"] == pytest.approx(0.1)
    assert "student_drkd.gain_over_student.APs" not in numbers
    json.dumps(summary)  # plain json


def test_gap_closed_undefined_without_a_gap() -> None:
    assert rep.gap_closed(0.3, 0.2, 0.2) is None  # reference no better than the baseline
    assert rep.gap_closed(0.3, 0.25, 0.2) is None
    assert rep.gap_closed(0.3, -1.0, 0.4) is None
    assert rep.gap_closed(0.4, 0.2, 0.4) == 1.0
    summary = rep.summarize({"a": fake_metrics(0.2), "b": fake_metrics(0.3),
                             "c": fake_metrics(0.25)})
    assert summary["c"]["gap_closed"] is None
    assert summary["c"]["gain_over_b"]["AP"] == pytest.approx(-0.05)


def test_gap_closed_reads_dash_when_teacher_and_student_tie() -> None:
    """A teacher-student gap below the 0.1 AP point the table prints is a tie: gap closed is
    null in json and "-" in the table, never "0%" (nor "-5000%" for a 1e-5 AP gap)."""
    metrics = {"teacher": fake_metrics(0.00001), "student": fake_metrics(0.0),
               "student_drkd": fake_metrics(0.0)}
    summary = rep.summarize(metrics)
    assert summary["student_drkd"]["gap_closed"] is None
    assert rep.headline_gain(summary) == {"student_drkd": {"AP_gain": 0.0, "gap_closed": None}}
    assert json.loads(json.dumps(summary))["student_drkd"]["gap_closed"] is None
    assert "student_drkd.gap_closed" not in rep.summary_numbers(summary)
    row = next(line for line in rep.gain_table(metrics) if line.startswith("| student_drkd |"))
    assert row.endswith("| - |") and "%" not in row
    assert rep.gap_closed(0.25, 0.2, 0.2004) is None  # 20.0 vs 20.0 points: a tie as printed
    assert rep.gap_closed(0.2, 0.2, 0.201) == 0.0  # 20.1 vs 20.0: a gap, nothing closed
    # 30.049 vs 30.051 print as 30.0 and 30.1, but the gap is 0.002 points: a tie.
    assert rep.gap_closed(0.3055, 0.30049, 0.30051) is None


def test_dvc_metrics_files_hold_only_headline_numbers(evaluated: Path) -> None:
    """`dvc metrics show` stays a table a person reads: every dvc.yaml metrics file is the
    --headline output of its stage, which holds AP .. AR100 (evaluate) or AP gain and gap
    closed (report); per-class AP, size, speed and every delta live in plain outs."""
    stages = dvc_stages(ROOT / "dvc.yaml")
    declared = {path for stage in stages.values() for path in stage.get("metrics", [])}
    assert declared == {"metrics/teacher.json", "metrics/student.json",
                        "metrics/student_drkd.json", "metrics/gain.json"}
    for name, stage in stages.items():
        for path in stage.get("metrics", []):
            assert f"--headline {path}" in " ".join(stage["cmd"].split()), (name, path)
    assert set(json.loads((evaluated / "metrics" / "teacher.json").read_text())) == set(KEYS)
    summary = rep.summarize({"teacher": fake_metrics(0.4), "student": fake_metrics(0.2),
                             "student_drkd": fake_metrics(0.3)})
    assert {key for row in rep.headline_gain(summary).values() for key in row} == {
        "AP_gain", "gap_closed"}


@pytest.fixture(scope="module")
def relation_models(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """teacher.pt, student_drkd.pt and the DRKD modules of a toy Distiller."""
    torch.manual_seed(0)
    return write_relation_models(tiny_data, tmp_path_factory.mktemp("relation_models"))


def test_report_three_models_gain_table_and_relation_plots(
        evaluated: Path, tiny_data: Path, tmp_path: Path, relation_models: dict[str, Path],
        saved_figures: dict[str, Any]) -> None:
    """The report as dvc.yaml runs it: teacher, student and the distilled student, the gain
    table, and the relation plots from the teacher, the distilled student and its modules."""
    for name, ap in (("teacher", 0.4), ("student", 0.2), ("student_drkd", 0.3)):
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "metrics.json").write_text(json.dumps(fake_metrics(ap)))
        (tmp_path / "eval" / name / "detections.json").write_text(
            (evaluated / "eval" / "teacher" / "detections.json").read_text())
    history = tmp_path / "train_student_drkd.csv"
    with history.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "classification", "epoch", "loss", "loss_ins", "loss_ir",
                         "loss_pr", "lr"])
        for step in range(1, 6):
            writer.writerow([step, 1 / step, 0, 1.5 / step, 1e-3, 0.0, 2e-4 / step, 1e-3])
    # 3 images: the third is the first of the tiny val set with 2 instances to relate.
    params = write_params(tmp_path / "params.yaml", num_vis_images=3)
    assert report.main([
        "--models", "teacher", "student", "student_drkd", "--eval-dir", str(tmp_path / "eval"),
        "--data", str(tiny_data), "--histories", str(evaluated / "train_student.csv"),
        str(history), "--summary", str(tmp_path / "summary.json"),
        "--headline", str(tmp_path / "gain.json"),
        "--table", str(tmp_path / "summary.md"), "--plots-dir", str(tmp_path / "plots"),
        "--params", str(params), "--teacher", str(relation_models["teacher"]),
        "--distilled", str(relation_models["student_drkd"]),
        "--modules", str(relation_models["modules"])]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["student_drkd"]["gap_closed"] == 0.5
    assert summary["student_drkd"]["gain_over_student"]["AP"] == pytest.approx(0.1)
    headline = json.loads((tmp_path / "gain.json").read_text())
    assert headline == {"student_drkd": {"AP_gain": pytest.approx(0.1), "gap_closed": 0.5}}
    table = (tmp_path / "summary.md").read_text()
    assert "## Gain over student (val, AP points)" in table
    assert "teacher-student AP gap closed |" in table
    assert "| student_drkd | +10.0 | +10.0 | +10.0 | - | +10.0 | +10.0 | +10.0 | 50% |" in table
    assert table.index("## Gain over student") < table.index("## Per-class AP")
    assert sorted(saved_figures) == ["ap_by_size.png", "detections.png", "instance_relations.png",
                                     "loss_curves.png", "pixel_relations.png"]
    titles = {name: fig.get_suptitle() for name, fig in saved_figures.items()
              if name.endswith("relations.png")}
    assert titles == {
        "pixel_relations.png": "Pixel relations of a query point, finest FPN level",
        "instance_relations.png": "Instance relation matrices, finest instance level "
                                  "(rows sum to 1)"}
    assert (tmp_path / "plots" / "glore_drift.json").is_file()
    (ax,) = saved_figures["ap_by_size.png"].axes
    assert len(ax.patches) == 3 * len(rep.SIZE_BUCKETS)


def test_loss_curves_put_distillation_terms_on_their_own_subplot(
        saved_figures: dict[str, Any], tmp_path: Path) -> None:
    steps = [1.0, 2.0, 3.0]
    plain = {"step": steps, "classification": [1.0, 0.5, 0.4], "loss": [1.0, 0.5, 0.4],
             "lr": [1e-3] * 3, "epoch": [0.0] * 3, "seconds": [0.5, 1.0, 1.5],  # not losses
             "peak_memory_mb": [300.0, 310.0, 310.0]}
    drkd = {**plain, "loss_pr": [1e-4, 2e-4, 1e-4], "loss_ir": [0.0, 1e-3, 1e-3],
            "loss_ins": [1e-3, 1e-3, 1e-3]}
    plots.plot_loss_curves({"student": plain, "student_drkd": drkd}, tmp_path / "x.png")
    axes = {ax.get_title(): ax for ax in saved_figures["x.png"].axes if ax.get_title()}
    assert set(axes) == {"student", "student_drkd", "student_drkd: distillation terms"}
    labels = {t: [line.get_label() for line in ax.get_lines()] for t, ax in axes.items()}
    assert labels["student_drkd"] == ["classification", "loss (total)"]
    assert labels["student_drkd: distillation terms"] == ["loss_pr", "loss_ir", "loss_ins"]
    assert axes["student_drkd: distillation terms"].get_yscale() == "symlog"  # a 0 value
    assert axes["student"].get_yscale() == "log"


def test_save_figure_is_atomic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    path = tmp_path / "plots" / "p.png"
    fig, _ = plt.subplots()
    plots.save_figure(fig, path)
    before = path.read_bytes()
    assert Image.open(path).format == "PNG"

    def broken(self: Figure, fname: Any, *args: Any, **kwargs: Any) -> None:
        Path(fname).write_bytes(b"half a png")  # a write that dies midway
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plots.save_figure(plt.subplots()[0], path)
    assert path.read_bytes() == before  # the old plot survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["p.png"]  # no temp file left


def test_a_pipe_in_a_class_name_stays_in_its_cell() -> None:
    """A class named "a|b" (any non-empty name is valid) is escaped, so its row keeps one cell
    per model and its AP stays under the model's column."""
    metrics = {m: {**fake_metrics(0.4), "per_class_AP": {"a|b": 0.25}} for m in ("x", "y")}
    row = next(line for line in rep.markdown_table(metrics).splitlines()
               if line.startswith("| a"))
    assert row == r"| a\|b | 25.0 | 25.0 |"
    assert len(re.split(r"(?<!\\)\|", row)) == 5  # three cells between unescaped bars
