"""The BCCD preset on real images: prepare a handful of BCCD images through the VOC reader,
train the teacher and the student for a few steps, distil, and evaluate all three with the
real stages, on non-square (4:3) padded batches. Skipped where the dataset is absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from drkd.checkpoint import load_detector
from drkd.config import load_params
from drkd.data.coco import CocoDetection
from drkd.data.transforms import eval_transforms
from stages import distill, evaluate, prepare, preset, train

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "presets" / "bccd.yaml"
BCCD = ROOT.parent / "shared" / "data" / "bccd" / "BCCD"
CLASSES = ["RBC", "WBC", "Platelets"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (BCCD / "Annotations").is_dir(),
        reason=f"BCCD not found at {BCCD} (the team's shared data folder next to the repo)",
    ),
]

# Toy-sized on top of the preset: 640x480 -> 128x96 (still 4:3, padded batches non-square),
# 16-channel FPNs, 2 steps per training, a few images.
# score_thresh 0: 2-step models score low, and the checks below need detections to check.
TOY_MODEL = {"fpn_channels": 16, "min_size": 96, "max_size": 128, "score_thresh": 0.0}
TOY_TRAIN = {"epochs": 1, "max_steps": 2, "batch_size": 2, "num_workers": 0, "warmup_steps": 1,
             "log_every": 1}
TOY = {
    "data": {"voc": {"root": str(BCCD), "max_images": 4}},
    "teacher": {"model": TOY_MODEL, "train": TOY_TRAIN},
    "student": {"model": TOY_MODEL, "train": TOY_TRAIN},
    "distill": {"pixel": {"nodes": [4] * 5, "states": [8] * 5},
                "instance": {"embed_dim": 16, "filter_hidden": 8}},
    "evaluate": {"batch_size": 4, "timing_images": 1},
    "tracking": {"enabled": False},
}


def test_preset_names_the_shared_dataset_and_validates(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    assert preset.main([str(PRESET), "--params", str(params), "--apply"]) == 0
    bccd = load_params(params)
    assert bccd.data.source == "voc"
    # Relative to the repo root, where dvc runs the stages.
    assert (ROOT / bccd.data.voc.root).resolve() == BCCD.resolve()
    assert bccd.data.voc.classes == tuple(CLASSES)
    assert (bccd.teacher.model.min_size, bccd.teacher.model.max_size) == (192, 256)
    assert bccd.student.model.fpn_channels < bccd.teacher.model.fpn_channels


def test_bccd_study_runs_on_real_non_square_images(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    assert preset.main([str(PRESET), "--params", str(params), "--apply"]) == 0
    toy = tmp_path / "toy.yaml"
    toy.write_text(yaml.safe_dump(TOY))
    assert preset.main([str(toy), "--params", str(params), "--apply"]) == 0

    data = tmp_path / "prepared"
    assert prepare.main(["--params", str(params), "--out", str(data)]) == 0
    stats = json.loads((data / "stats.json").read_text())
    assert stats["source"] == "voc"
    assert stats["train"]["images"] == stats["val"]["images"] == 4
    # The first 4 ids of train.txt / val.txt, counted here from the XMLs themselves.
    for split in ("train", "val"):
        ids = (BCCD / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[:4]
        objects = sum((BCCD / "Annotations" / f"{i}.xml").read_text().count("<object>")
                      for i in ids)
        dropped = sum(stats[split]["dropped_boxes"].values())
        assert stats[split]["instances"] == objects - dropped
    val = CocoDetection(data / "val.json", eval_transforms())
    assert val.category_names == CLASSES

    common = ["--params", str(params), "--data", str(data)]
    models = {name: tmp_path / f"{name}.pt" for name in ("teacher", "student", "student_drkd")}
    for name, main, args in (("teacher", train.main, ["teacher"]),
                             ("student", train.main, ["student"]),
                             ("student_drkd", distill.main, ["--teacher", str(models["teacher"])])):
        assert main([*args, *common, "--out", str(models[name]),
                     "--history", str(tmp_path / f"{name}.csv"),
                     "--work-dir", str(tmp_path / "work" / name)]) == 0
    header = (tmp_path / "student_drkd.csv").read_text().splitlines()[0]
    assert all(term in header for term in ("loss_pr", "loss_ir", "loss_ins"))

    # The detectors see 4:3 batches: 640x480 resized to 128x96, padded to multiples of 32.
    model, _ = load_detector(models["student"])
    model.eval()
    batch, _ = model.transform([val[0][0], val[1][0]])
    assert tuple(batch.tensors.shape[-2:]) == (96, 128)

    for name, ckpt in models.items():
        metrics_file = tmp_path / "metrics" / f"{name}.json"
        assert evaluate.main([name, "--checkpoint", str(ckpt), *common, "--metrics",
                              str(metrics_file), "--detections",
                              str(tmp_path / "eval" / name / "detections.json")]) == 0
        metrics = json.loads(metrics_file.read_text())
        assert set(metrics["per_class_AP"]) == set(CLASSES)
        assert 0 <= metrics["AP50"] <= 1
        detections = json.loads((tmp_path / "eval" / name / "detections.json").read_text())
        assert detections, name
        assert {d["category_id"] for d in detections} <= {1, 2, 3}
        assert {d["image_id"] for d in detections} <= {1, 2, 3, 4}
