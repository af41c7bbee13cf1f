"""Presets stay valid: the smoke preset and the paper presets, each run for one training step
with toy-sized overrides (their data and weight paths point to files CI does not have)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from drkd.checkpoint import load_detector
from drkd.config import ModelConfig, from_dict, load_params
from drkd.data.coco import CocoDetection
from drkd.models import build_detector, count_parameters
from stages import distill, preset, train

ROOT = Path(__file__).resolve().parents[1]
TOY = {
    "data": {"source": "synthetic"},
    "tracking": {"enabled": False},
    "distill": {"pixel": {"nodes": [4] * 5, "states": [8] * 5},
                "instance": {"embed_dim": 16, "filter_hidden": 8}},
}
TOY_MODEL = {"fpn_channels": 16, "min_size": 64, "max_size": 64, "weights": "",
             "backbone_weights": "", "rpn_pre_nms_top_n": 100, "rpn_post_nms_top_n": 50,
             "roi_batch_size": 32}
TOY_TRAIN = {"epochs": 1, "max_steps": 1, "batch_size": 2, "num_workers": 0, "warmup_steps": 1}


@pytest.mark.slow  # ResNet-50/101 detectors (the papers' backbones), a train and a distill step
@pytest.mark.parametrize("name", ["paper_faster_rcnn", "paper_retinanet"])
def test_paper_preset_trains_one_step(name: str, tiny_data: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    assert preset.main([str(ROOT / "presets" / f"{name}.yaml"), "--params", str(params),
                        "--apply"]) == 0
    paper = load_params(params)
    assert paper.student.model.min_size == 800 and paper.student.model.max_size == 1333
    assert paper.student.train.milestones == (16, 22) and paper.student.train.epochs == 24
    assert paper.distill.reduction == "norm"
    # The paper's instance relations, whatever the default (cosine, matrix target) is.
    inst = paper.distill.instance
    assert (inst.similarity, inst.target, inst.tau) == ("learned", "features", 9.787733192560397)
    assert paper.tune.space.w_ir == (1e-3, 0.1) and paper.tune.space.tau == (0.25, 16.0)
    toy = {**TOY, "teacher": {"model": TOY_MODEL, "train": TOY_TRAIN},
           "student": {"model": TOY_MODEL, "train": TOY_TRAIN}}
    overrides = tmp_path / "toy.yaml"
    overrides.write_text(yaml.safe_dump(toy))
    assert preset.main([str(overrides), "--params", str(params), "--apply"]) == 0
    assert load_params(params).student.model.backbone == paper.student.model.backbone

    common = ["--params", str(params), "--data", str(tiny_data)]
    teacher = tmp_path / "teacher.pt"
    assert train.main(["teacher", *common, "--out", str(teacher), "--history",
                       str(tmp_path / "t.csv"), "--work-dir", str(tmp_path / "wt")]) == 0
    out = tmp_path / "student_drkd.pt"
    assert distill.main([*common, "--teacher", str(teacher), "--out", str(out),
                       "--history", str(tmp_path / "s.csv"), "--work-dir",
                       str(tmp_path / "ws")]) == 0
    model, state = load_detector(out)
    assert type(model).__name__ == {"paper_faster_rcnn": "FasterRCNN",
                                    "paper_retinanet": "RetinaNet"}[name]
    # The export is the plain student: exactly the weights of a detector built from its config
    # (no DRKD module, no teacher), the baseline's parameter count.
    plain = build_detector(from_dict(ModelConfig, state["model_config"]),
                           CocoDetection(tiny_data / "train.json").num_classes)
    assert list(state["model"]) == list(plain.state_dict())
    assert count_parameters(model) == count_parameters(plain)
    header = (tmp_path / "s.csv").read_text().splitlines()[0]
    expected = {"paper_faster_rcnn": ["loss_pr", "loss_ir", "loss_ins"],
                "paper_retinanet": ["loss_ir"]}[name]
    assert all(term in header for term in expected)
    assert ("loss_pr" in header) == (name == "paper_faster_rcnn")


def test_smoke_preset_is_valid(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    assert preset.main([str(ROOT / "presets" / "smoke.yaml"), "--params", str(params)]) == 0
    assert preset.main([str(ROOT / "presets" / "smoke.yaml"), "--params", str(params),
                        "--apply"]) == 0
    assert load_params(params).data.synthetic.image_size == 64
