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

from conftest import detecting, toy_model
from drkd import checkpoint, cli
from drkd.checkpoint import model_checkpoint, save_atomic
from drkd.config import UserError
from drkd.data.coco import CocoDetection
from drkd.models import build_detector
from stages import export


def _saved_detector(arch: str, tiny_data: Path, folder: Path) -> Path:
    split = CocoDetection(tiny_data / "train.json")
    model = detecting(build_detector(toy_model(arch), split.num_classes))
    path = folder / f"{arch}.pt"
    save_atomic(model_checkpoint(model, toy_model(arch), split.category_ids,
                                 split.category_names), path)
    return path


@pytest.fixture(scope="module")
def detector(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _saved_detector("retinanet", tiny_data, tmp_path_factory.mktemp("export"))


# Every arch: their output dicts differ in order (Faster R-CNN's: boxes, labels, scores).
@pytest.fixture(scope="module", params=["retinanet", "faster_rcnn", "fcos"])
def any_detector(request: pytest.FixtureRequest, tiny_data: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _saved_detector(request.param, tiny_data, tmp_path_factory.mktemp("export"))


def test_onnx_runtime_gives_what_pytorch_gives(any_detector: Path, tiny_data: Path,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    detector = any_detector
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
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels"]
    boxes, scores, labels = session.run(None, {"image": image.numpy()})
    assert scores.dtype == np.float32 and labels.dtype == np.int64
    assert len(scores) == len(ref["scores"]) > 10
    # Near-equal scores may come out in either order: compare as sets, box by box.
    assert np.array_equal(np.sort(labels), np.sort(ref["labels"].numpy()))
    assert np.abs(np.sort(scores) - np.sort(ref["scores"].numpy())).max() < 1e-4
    for box, label in zip(boxes, labels, strict=True):
        same = ref["boxes"][ref["labels"] == int(label)].numpy()
        assert np.abs(same - box).max(axis=1).min() < 0.01
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
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "val.json").write_text('{"images": [], "categories": [], "annotations": []}')
    with pytest.raises(UserError, match="empty/val.json: no images to check the export on"):
        export.main([str(detector), "--out", str(out), "--data", str(empty)])
    (empty / "val.json").unlink()
    empty.rmdir()
    with pytest.raises(SystemExit):  # no image to check it on: refused, nothing written
        export.main([str(detector), "--out", str(out), "--check-images", "0"])
    assert "--check-images must be at least 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
