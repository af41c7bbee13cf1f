"""Check and clean a COCO-format dataset on disk before ``prepare`` writes anything.

Every problem is one ``UserError`` line naming the annotation file and the
offending id. Boxes are clipped to the image; boxes left under 1 px, or lying
entirely outside the image, are dropped and counted, crowd boxes too. Each image's header is
read: it must open, at the annotated size or that turned by its EXIF orientation; no two
entries may name one file, no two categories one name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from PIL import Image, UnidentifiedImageError

from drkd.config import UserError

BOX_KEYS = ("clipped", "degenerate", "outside")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


EXPECT: dict[str, Callable[[Any], bool]] = {
    "an int": _is_int,
    "a positive int": lambda v: _is_int(v) and v > 0,
    "a non-empty string": lambda v: isinstance(v, str) and bool(v),
}


class _Checker:
    """Raises one-line ``UserError``s prefixed with the annotation file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, message: str) -> NoReturn:
        raise UserError(f"{self.path}: {message}")

    def load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as err:
            self.fail(f"cannot read: {err.strerror or err}")
        except UnicodeDecodeError:
            self.fail("not valid JSON (not UTF-8 text)")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            self.fail(f"not valid JSON (line {err.lineno}: {err.msg})")
        if not isinstance(data, dict):
            self.fail(f"expected a JSON object at the top level, got {type(data).__name__}")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                self.fail(f"missing '{key}' list")
        return data

    def entry(self, kind: str, index: int, item: Any, fields: dict[str, str]) -> Any:
        """Check that an entry is an object with ``fields`` (name -> one of ``EXPECT``)."""
        if not isinstance(item, dict):
            self.fail(f"{kind} #{index}: expected an object, got {_short(item)}")
        label = f"{kind} {item['id']}" if _is_int(item.get("id")) else f"{kind} #{index}"
        for name, expect in fields.items():
            if not EXPECT[expect](item.get(name)):
                got = "missing" if name not in item else f"got {_short(item[name])}"
                self.fail(f"{label}: '{name}' must be {expect}, {got}")
        return item["id"]


# EXIF orientations that show the stored image turned by 90 degrees (width and height swap).
_TURNED = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


def image_size(path: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """(stored size, size as displayed after EXIF orientation), from the header only."""
    try:
        with Image.open(path) as im:
            stored = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, UnidentifiedImageError) as err:
        raise UserError(f"{path}: cannot read image: {err}") from None
    return stored, (stored[::-1] if orientation in _TURNED else stored)


def clip_box(bbox: list[float], width: int, height: int) -> tuple[list[float] | None, str | None]:
    """Clip an [x, y, w, h] box to the image; return (box or None, what happened or None).

    What happened: ``"outside"`` (no overlap with the image, dropped), ``"degenerate"``
    (under 1 px wide or high once clipped, dropped), ``"clipped"`` (kept, smaller), or None.
    The COCO and VOC readers share this rule.
    """
    x, y, w, h = bbox
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        return None, "outside"
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, width), min(y + h, height)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None, "degenerate"
    if (x0, y0, x1, y1) == (x, y, x + w, y + h):
        return list(bbox), None
    return [x0, y0, x1 - x0, y1 - y0], "clipped"


def clean_coco(
    annotation_file: Path, image_dir: Path, max_images: int
) -> tuple[dict[str, Any], dict[str, int]]:
    """Validate a COCO json and its images; return (cleaned COCO dict, dropped/clipped box counts).

    ``max_images > 0`` keeps the first N images by id and their annotations.
    Output ``file_name``s are absolute paths, so the json can live anywhere.
    """
    check = _Checker(Path(annotation_file))
    data = check.load()

    images: dict[int, dict[str, Any]] = {}
    for i, im in enumerate(data["images"]):
        image_id = check.entry(
            "image",
            i,
            im,
            {
                "id": "an int",
                "file_name": "a non-empty string",
                "width": "a positive int",
                "height": "a positive int",
            },
        )
        if image_id in images:
            check.fail(f"image {image_id}: duplicate image id")
        images[image_id] = im
    categories: dict[int, dict[str, Any]] = {}
    named: dict[str, int] = {}
    for i, cat in enumerate(data["categories"]):
        category_id = check.entry(
            "category", i, cat, {"id": "an int", "name": "a non-empty string"}
        )
        if category_id in categories:
            check.fail(f"category {category_id}: duplicate category id")
        if cat["name"] in named:  # per-class AP and the stats are keyed by name
            check.fail(f"categories {named[cat['name']]} and {category_id}: both are named "
                       f"{cat['name']!r}")
        categories[category_id] = cat
        named[cat["name"]] = category_id
    seen: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        ann_id = check.entry("annotation", i, ann, {"id": "an int"})
        if ann_id in seen:
            check.fail(f"annotation {ann_id}: duplicate annotation id")
        seen.add(ann_id)
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in images:
            check.fail(f"annotation {ann_id} points to unknown image {_short(ann.get('image_id'))}")
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in categories:
            check.fail(
                f"annotation {ann_id} points to unknown category {_short(ann.get('category_id'))}"
            )
        raw = ann.get("bbox")
        if not (isinstance(raw, list) and len(raw) == 4 and all(_is_number(v) for v in raw)):
            check.fail(f"annotation {ann_id}: bbox must be 4 numbers, got {_short(raw)}")
        if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
            check.fail(
                f"annotation {ann_id}: area must be a non-negative number, "
                f"got {_short(ann['area'])}"
            )
        if ann.get("iscrowd", 0) not in (0, 1):
            check.fail(f"annotation {ann_id}: iscrowd must be 0 or 1, got {_short(ann['iscrowd'])}")

    kept_ids = sorted(images)[:max_images] if max_images > 0 else sorted(images)
    out_images = []
    read_by: dict[Path, int] = {}
    for image_id in kept_ids:
        im = images[image_id]
        path = image_dir / im["file_name"]
        if not path.is_file():
            check.fail(f"image {image_id}: file not found: {path}")
        resolved = path.resolve()
        if resolved in read_by:
            check.fail(f"images {read_by[resolved]} and {image_id}: both are {path}")
        read_by[resolved] = image_id
        # Opened here (its header), not first in a training worker: a file that does not
        # read, or whose size is neither the annotated one nor that one turned by its EXIF
        # orientation (the boxes' frame would be unknown), stops prepare.
        try:
            stored, shown = image_size(path)
        except UserError as err:
            check.fail(f"image {image_id}: {err}")
        if (im["width"], im["height"]) not in (stored, shown):
            turned = f", {shown[0]}x{shown[1]} as displayed" if shown != stored else ""
            check.fail(f"image {image_id}: width x height {im['width']}x{im['height']} but "
                       f"{path} is {stored[0]}x{stored[1]}{turned}")
        out_images.append(
            {
                "id": image_id,
                "file_name": str(resolved),
                "width": im["width"],
                "height": im["height"],
            }
        )

    counts = dict.fromkeys(BOX_KEYS, 0)
    kept = set(kept_ids)
    out_annotations = []
    for ann in data["annotations"]:
        if ann["image_id"] not in kept:
            continue
        crowd = int(ann.get("iscrowd", 0))
        im = images[ann["image_id"]]
        # Crowd boxes too: an ignore region outside the image or of negative size would
        # still be matched by COCOeval.
        bbox, event = clip_box(ann["bbox"], im["width"], im["height"])
        if event is not None:
            counts[event] += 1
        if bbox is None:
            continue
        area = bbox[2] * bbox[3]
        if "area" in ann:
            area = ann["area"] if event is None else min(ann["area"], area)
        out_annotations.append(
            {
                "id": ann["id"],
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": bbox,
                "area": area,
                "iscrowd": crowd,
            }
        )

    out_categories = [
        {k: cat[k] for k in ("id", "name", "supercategory") if k in cat}
        for _, cat in sorted(categories.items())
    ]
    return (
        {"images": out_images, "annotations": out_annotations, "categories": out_categories},
        counts,
    )
