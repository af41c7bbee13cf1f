"""A prepared COCO-format split as a torch Dataset.

Items are ``(image, target)``: a uint8 ``tv_tensors.Image`` (3, H, W) and
``{"boxes": BoundingBoxes (N, 4) XYXY, "labels": int64 (N,), "image_id": int}``.
Training labels are contiguous 1..K in sorted category-id order (0 is the
background); ``category_ids[label - 1]`` maps back for evaluation. Crowd boxes
are not training targets (they stay in the json for COCOeval).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from drkd.config import UserError


def as_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: grayscale, palette and RGBA images converted; 16-bit grayscale
    (microscopy, X-ray) scaled to 8 bits (PIL's own conversion clips it at 255: nearly white)."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        levels = np.asarray(image, dtype=np.float64) / 257  # 65535 -> 255
        image = Image.fromarray(levels.clip(0, 255).round().astype(np.uint8))
    return image.convert("RGB")


def displayed(image: Image.Image) -> Image.Image:
    """``image`` as it is displayed: its EXIF orientation (a phone photo's turn or mirror)
    applied."""
    return ImageOps.exif_transpose(image) or image  # None only when asked to work in place


def load_rgb(path: Path, width: int, height: int, upright: bool = False) -> Image.Image:
    """Open an image as 8-bit RGB (``as_rgb``) in the orientation its annotations use.

    An EXIF-rotated file is transposed when that makes its size match the json's width/height
    (annotation tools label what they display; a file labelled as stored stays so); with
    ``upright`` (images without annotations, as displayed) it always is.
    """
    with Image.open(path) as raw:
        image: Image.Image = raw
        if upright or raw.size != (width, height):
            turned = displayed(raw)
            if turned.size != (width, height):
                raise UserError(
                    f"{path}: image is {raw.size[0]}x{raw.size[1]} but its annotation "
                    f"file says {width}x{height}"
                )
            image = turned
        return as_rgb(image)


class CocoDetection(Dataset[tuple[tv_tensors.Image, dict[str, Any]]]):
    """A COCO-format split: (image (3, H, W) uint8, target) pairs, target boxes XYXY in pixels
    and labels 1..K in the categories' id order; ``upright``: read as ``load_rgb`` says."""

    def __init__(self, annotation_file: str | Path, transforms: v2.Transform | None = None,
                 upright: bool = False) -> None:
        self.annotation_file = path = Path(annotation_file)
        self.upright = upright
        if not path.is_file():
            raise UserError(f"{path}: not found")
        try:
            coco = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: not JSON ({err})") from None
        if not isinstance(coco, dict) or not {"images", "categories", "annotations"} <= set(coco):
            raise UserError(f"{path}: not a COCO-format split (images, categories, annotations)")
        self.root = self.annotation_file.parent
        self.images: list[dict[str, Any]] = sorted(coco["images"], key=lambda im: im["id"])
        self.category_ids: list[int] = sorted(c["id"] for c in coco["categories"])
        self.category_names: list[str] = [
            c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])
        ]
        label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        self.targets: dict[int, tuple[list[list[float]], list[int]]] = {
            im["id"]: ([], []) for im in self.images
        }
        for ann in coco["annotations"]:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            boxes, labels = self.targets[ann["image_id"]]
            boxes.append([x, y, x + w, y + h])
            labels.append(label_of[ann["category_id"]])
        self.transforms = transforms

    @property
    def num_classes(self) -> int:
        """Including the background, as torchvision detectors count."""
        return len(self.category_ids) + 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        info = self.images[index]
        pil = load_rgb(self.root / info["file_name"], info["width"], info["height"],
                       self.upright)
        image = tv_tensors.Image(v2.functional.pil_to_tensor(pil))
        boxes, labels = self.targets[info["id"]]
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                format="XYXY",
                canvas_size=(pil.height, pil.width),
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": int(info["id"]),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def coco_detections(output: dict[str, torch.Tensor],
                    category_ids: list[int]) -> list[dict[str, Any]]:
    """One image's detector output (boxes (K, 4) XYXY, scores (K,), labels (K,): 1..C, the
    dataset's categories in order) -> COCO results without the image id: the dataset's
    ``category_id``, ``bbox`` [x, y, w, h] and ``score``, rounded as the json keeps them."""
    boxes = output["boxes"].detach().cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]  # XYXY -> XYWH
    return [{"category_id": category_ids[label - 1], "bbox": [round(v, 2) for v in box],
             "score": round(score, 5)}
            for box, score, label in zip(boxes.tolist(), output["scores"].tolist(),
                                         output["labels"].tolist(), strict=True)
            if label != 0]  # RetinaNet/FCOS also score the background slot
