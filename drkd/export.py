"""Export a trained detector to ONNX and check ONNX Runtime against PyTorch.

The export is torchvision's detector as it is, pre- and post-processing included: its input is
one float image (3, H, W) in [0, 1], any H and W (the resize to ``min_size``/``max_size``
happens inside, as in PyTorch); its outputs are ``boxes`` (N, 4) x1, y1, x2, y2 in the input
image's pixels, ``scores`` (N,) and ``labels`` (N,) (training labels 1..K; the checkpoint's
``category_ids[label - 1]`` is the dataset's id, and the file's metadata holds the ids and
names; RetinaNet and FCOS score label 0, the background, too: drop it, as evaluation does).
It uses PyTorch's TorchScript-based exporter
(``dynamo=False``), the path torchvision documents for its detection models, at ``OPSET``.
What torchvision's export does not cover: a batch of several images in one call (the graph is
traced with one image), and a different score threshold, NMS IoU or detections cap without
re-exporting (they are constants of the graph).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from drkd.checkpoint import load_detector
from drkd.config import UserError
from drkd.data.coco import CocoDetection
from drkd.data.transforms import eval_transforms
from drkd.files import atomic_path, require_files

OPSET = 17  # torchvision's detection export needs >= 11; ONNX Runtime runs 17 on every provider


class _NamedOutputs(nn.Module):
    """``detector`` returning (boxes, scores, labels) for one image, in that order whatever
    order its output dict has (Faster R-CNN's is boxes, labels, scores)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = self.detector(images)[0]
        return out["boxes"], out["scores"], out["labels"]


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path,
                categories: dict[int, str] | None = None) -> None:
    """Write ``model`` (eval mode) as ONNX to ``path``, traced on ``example`` (3, H, W), with
    ``categories`` (dataset id -> name, in label order) in the file's metadata, so the file
    alone maps its labels: ``category_ids`` and ``category_names`` (JSON lists), ``labels``."""
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        _NamedOutputs(model), ([example],), str(path), opset_version=OPSET, dynamo=False,
        input_names=["image"], output_names=["boxes", "scores", "labels"],
        dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                      "scores": {0: "detections"}, "labels": {0: "detections"}},
    )
    if categories:
        import onnx

        proto = onnx.load(str(path))
        for key, value in {
            "category_ids": json.dumps(list(categories)),
            "category_names": json.dumps(list(categories.values())),
            "labels": "label L is category_ids[L - 1]; label 0 is the background: drop it",
        }.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, str(path))


def detection_differences(ref: dict[str, torch.Tensor], boxes: np.ndarray, scores: np.ndarray,
                          labels: np.ndarray) -> tuple[float, float] | None:
    """How far one image's detections (N, 4) / (N,) / (N,) are from ``ref`` (a detector's
    output dict): None when the count of some label differs, else the largest box difference
    in pixels (each box against the nearest box of its label on the other side, both ways)
    and the largest score difference (each label's scores sorted). Order-free: two detections
    with near-equal scores may come out in either order."""
    if not np.array_equal(np.sort(labels), np.sort(ref["labels"].numpy())):
        return None
    box_diff = score_diff = 0.0
    for label in np.unique(labels):
        ours, theirs = labels == label, ref["labels"] == int(label)
        apart = torch.cdist(torch.from_numpy(boxes[ours]), ref["boxes"][theirs], p=float("inf"))
        box_diff = max(box_diff, float(apart.min(1).values.max()), float(apart.min(0).values.max()))
        sorted_ref = ref["scores"][theirs].sort().values.numpy()
        score_diff = max(score_diff, float(np.abs(np.sort(scores[ours]) - sorted_ref).max()))
    return box_diff, score_diff


@torch.no_grad()
def compare_onnx(model: nn.Module, path: Path, images: list[torch.Tensor]) -> dict[str, Any]:
    """Run PyTorch and ONNX Runtime (CPU) on each image (3, H, W); returns the number of images
    whose detection count of some label differs, and the largest box (pixels) and score
    difference over the others (``detection_differences``)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model.eval()
    mismatched, box_diff, score_diff, detections = 0, 0.0, 0.0, 0
    for image in images:
        ref = model([image])[0]
        boxes, scores, labels = session.run(None, {"image": image.numpy()})
        detections += len(scores)
        differences = detection_differences(ref, boxes, scores, labels)
        if differences is None:
            mismatched += 1
            continue
        box_diff, score_diff = max(box_diff, differences[0]), max(score_diff, differences[1])
    return {"images": len(images), "detections": detections, "mismatched_images": mismatched,
            "max_box_diff_px": box_diff, "max_score_diff": score_diff}


def export_checked(checkpoint: Path, data: Path, out: Path, check_images: int, box_tol: float,
                   score_tol: float) -> dict[str, Any]:
    """The detector of ``checkpoint`` as ONNX at ``out``, written only if ONNX Runtime agrees
    with PyTorch on the first ``check_images`` validation images of ``data``: the same number
    of detections and labels, boxes within ``box_tol`` pixels, scores within ``score_tol``
    (else one UserError line, nothing written). Returns ``compare_onnx``'s report."""
    require_files([data / "val.json"])
    model, state = load_detector(checkpoint)
    categories = dict(zip(state["category_ids"], state["category_names"], strict=True))
    val = CocoDetection(data / "val.json", eval_transforms())
    if not len(val):
        raise UserError(f"{data / 'val.json'}: no images to check the export on")
    count = min(check_images, len(val))
    images = [val[i][0].as_subclass(torch.Tensor) for i in range(max(count, 1))]
    with atomic_path(out) as tmp:
        export_onnx(model, images[0], tmp, categories)
        report = compare_onnx(model, tmp, images[:count])
        bad = (report["mismatched_images"] or report["max_box_diff_px"] > box_tol
               or report["max_score_diff"] > score_tol)
        if bad:  # nothing is written: the temporary file goes with the error
            raise UserError(f"{out}: ONNX Runtime differs from PyTorch on {data}: {report}")
    return report
