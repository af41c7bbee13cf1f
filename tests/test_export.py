"""`python -m stages.export`: a trained detector to ONNX, ONNX Runtime against PyTorch on the
validation images (the toy detector made to detect, so boxes, scores and labels are compared
over real detections), any input size, and a failed check that writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from conftest import toy_model
from drkd import checkpoint, cli
from drkd.checkpoint import model_checkpoint, save_atomic
from drkd.data.coco import CocoDetection
from drkd.models import build_detector
from stages import export


@pytest.fixture(scope="module")
def detector(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    split = CocoDetection(tiny_data / "train.json")
    model = build_detector(toy_model(), split.num_classes)
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.fill_(2.0)  # it detects
    path = tmp_path_factory.mktemp("export") / "student.pt"
    save_atomic(model_checkpoint(model, toy_model(), split.category_ids, split.category_names),
                path)
    return path


def test_onnx_runtime_gives_what_pytorch_gives(detector: Path, tiny_data: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "student.onnx"
    assert export.main([str(detector), "--out", str(out), "--data", str(tiny_data),
                        "--check-images", "4"]) == 0
    assert "same counts and labels" in capsys.readouterr().out
    # Independently of the stage's own check: another image size than the traced one.
    from drkd.checkpoint import load_detector

    model, _ = load_detector(detector)
    image = torch.rand(3, 40, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.eval()([image])[0]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"image": image.numpy()})
    assert len(scores) == len(ref["scores"]) > 10
    assert np.array_equal(labels, ref["labels"].numpy())
    assert np.abs(boxes - ref["boxes"].numpy()).max() < 0.01
    assert boxes[:, 2].max() <= 96 and boxes[:, 3].max() <= 40  # in the input image's pixels
    # The file alone maps its labels to the dataset's categories.
    meta = session.get_modelmeta().custom_metadata_map
    state = checkpoint.load(detector)
    assert json.loads(meta["category_ids"]) == list(state["category_ids"])
    assert json.loads(meta["category_names"]) == list(state["category_names"])


def test_a_failed_check_is_one_line_and_writes_nothing(
        detector: Path, tiny_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "student.onnx"
    code = cli.run(export.main, [str(detector), "--out", str(out), "--data", str(tiny_data),
                                 "--check-images", "2", "--score-tol", "-1"])  # cannot pass
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: ONNX Runtime differs"), err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):  # no image to check it on: refused, nothing written
        export.main([str(detector), "--out", str(out), "--check-images", "0"])
    assert "--check-images must be at least 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
