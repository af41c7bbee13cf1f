"""A trained detector as an MLflow pyfunc model: what `mlflow.pyfunc.load_model` and
`mlflow models serve` run.

Input: a DataFrame with one column ``image``, each row an encoded image file (PNG, JPEG, ...)
as a base64 string (``encode_image``). Output: one row per detection, with the image's row
index, the dataset's own category id and name, the box as x, y, w, h in the image's pixels,
and the score: the same detections ``python -m stages.predict`` writes for that image.
The model's artifact is the checkpoint as training wrote it. MLflow logs this file as the
model's code ("models from code": nothing pickled) and this package beside it, so a fresh
process needs only the pinned packages the model lists (torch, torchvision, ruamel.yaml). No
stage imports this module (tracking passes its path), so editing it reruns no DVC stage.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms.v2.functional import pil_to_tensor

from drkd.data.coco import as_rgb, coco_detections, displayed
from drkd.data.transforms import eval_transforms

COLUMNS = ["image", "category_id", "category_name", "x", "y", "w", "h", "score"]


def encode_image(path: str | Path) -> str:
    """An image file's bytes as base64 text: one cell of the model's ``image`` column."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def decode_image(text: str, row: int = 0) -> torch.Tensor:
    """A base64 image -> float (3, H, W) in [0, 1], RGB, as evaluation feeds the detector, in
    the orientation it is displayed in (a phone photo's EXIF rotation applied). Anything else
    is an MLflow error naming ``row`` (the REST service answers 400 with it)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError):
        raise MlflowException(f"row {row}: not base64 text", INVALID_PARAMETER_VALUE) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = tv_tensors.Image(pil_to_tensor(as_rgb(displayed(image))))
    except (UnidentifiedImageError, OSError):
        raise MlflowException(f"row {row}: not an image file (PNG, JPEG, ...)",
                              INVALID_PARAMETER_VALUE) from None
    return eval_transforms()(pixels).as_subclass(torch.Tensor)


class DetectorModel(PythonModel):  # type: ignore[misc]
    """The checkpoint artifact ``checkpoint``, rebuilt by ``drkd.checkpoint.load_detector``."""

    # No type hints on predict: MLflow would read them as a schema; the logged signature (from
    # the input example) is the schema.
    def load_context(self, context: Any) -> None:
        from drkd.checkpoint import load_detector
        from drkd.devices import pick_device

        self.device = pick_device()  # a GPU where there is one
        self.model, state = load_detector(context.artifacts["checkpoint"])
        self.model.to(self.device).eval()
        self.names = dict(zip(state["category_ids"], state["category_names"], strict=True))
        self.ids = list(state["category_ids"])

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        rows = []
        with torch.no_grad():
            for index, text in enumerate(model_input["image"]):
                out = self.model([decode_image(text, index).to(self.device)])[0]
                rows += [[index, d["category_id"], self.names[d["category_id"]], *d["bbox"],
                          d["score"]] for d in coco_detections(out, self.ids)]
        return pd.DataFrame(rows, columns=COLUMNS)


set_model(DetectorModel())
