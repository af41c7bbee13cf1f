"""Run a trained detector on images: COCO-format detections (the dataset's own category ids,
with names), and optionally the images with their boxes drawn.

Inputs are image files, folders of them, or a prepared COCO-format split (a json, e.g.
``data/prepared/val.json``; a VOC split is prepared into one by `dvc repro prepare`). Files and
folders become a split of their own, images numbered 1..N in the order given (a folder's
images sorted by name), so the same code path as evaluation runs them
(``drkd.evaluation.predict``): on a split, at `evaluate.batch_size`, the detections are
exactly what `evaluate` scored. At another batch size they can differ slightly where images of
different sizes share a batch (a batch is padded to its largest image, and the padding reaches
the features near the border); where every image resizes to one size (the synthetic data,
BCCD) they do not. One image a batch (the stage's default) is what the served model does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes

from drkd.config import UserError
from drkd.data.coco import CocoDetection, displayed, load_rgb
from drkd.files import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def image_files(inputs: list[Path]) -> list[Path]:
    """Files as given and every image in a folder (sorted by name); a missing path, a folder
    without images or a split .json among other inputs is an error naming it."""
    files: list[Path] = []
    for path in inputs:
        if path.suffix.lower() == ".json":
            raise UserError(f"{path}: a split .json is read on its own (give it as the only input)")
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def split_of_images(files: list[Path], category_ids: list[int], category_names: list[str],
                    annotation_file: Path) -> Path:
    """Write a COCO-format split of ``files`` (ids 1..N, no annotations, the checkpoint's
    categories) to ``annotation_file``; an unreadable image is an error naming it."""
    images = []
    for number, path in enumerate(files, start=1):
        try:
            with Image.open(path) as image:  # the size it is displayed at (EXIF rotation)
                width, height = displayed(image).size
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"{path}: not a readable image ({err.__class__.__name__})") from None
        images.append({"id": number, "file_name": str(path.resolve()), "width": width,
                       "height": height})
    categories = [{"id": i, "name": n} for i, n in zip(category_ids, category_names, strict=True)]
    annotation_file.write_text(json.dumps({"images": images, "categories": categories,
                                           "annotations": []}))
    return annotation_file


def named(detections: list[dict[str, Any]], split: CocoDetection) -> list[dict[str, Any]]:
    """Each detection with its image's file name and its category's name beside the ids."""
    files = {im["id"]: im["file_name"] for im in split.images}
    names = dict(zip(split.category_ids, split.category_names, strict=True))
    return [{**d, "file_name": files[d["image_id"]], "category_name": names[d["category_id"]]}
            for d in detections]


def draw(split: CocoDetection, detections: list[dict[str, Any]], folder: Path,
         score_thresh: float) -> int:
    """Every image of ``split`` with its detections scoring at least ``score_thresh`` drawn
    (box and "name score"), as ``folder``/<image id>_<image stem>.png; returns the number of
    images."""
    folder.mkdir(parents=True, exist_ok=True)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for d in detections:
        if d["score"] >= score_thresh:
            by_image.setdefault(d["image_id"], []).append(d)
    names = dict(zip(split.category_ids, split.category_names, strict=True))
    for info in split.images:
        picture = pil_to_tensor(load_rgb(split.root / info["file_name"], info["width"],
                                         info["height"], split.upright))
        shown = by_image.get(info["id"], [])
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in shown)],
                             dtype=torch.float32).reshape(-1, 4)
        labels = [f"{names[d['category_id']]} {d['score']:.2f}" for d in shown]
        drawn = draw_bounding_boxes(picture, boxes, labels, colors="red", width=2)
        out = folder / f"{info['id']}_{Path(info['file_name']).stem}.png"  # ids keep names apart
        with atomic_path(out) as tmp:
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    return len(split.images)
