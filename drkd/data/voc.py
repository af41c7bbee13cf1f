"""A Pascal VOC-style dataset -> the COCO-format splits every later stage reads.

Layout (as in VOC 2007/2012, BCCD and most labelImg exports)::

    root/Annotations/<id>.xml      one file per image: <size>, <object>s
    root/JPEGImages/<id>.jpg       the images (also found through the XML's <filename>)
    root/ImageSets/Main/<split>.txt  one image id per line (train, val, trainval, test, ...)

Conventions (the README's "Your own data" says the same for users):

- Coordinates: VOC boxes are 1-based inclusive pixel indices (the top-left pixel is
  (1, 1); a box from xmin to xmax covers xmax - xmin + 1 pixels). COCO boxes are continuous
  [x, y, w, h] with the image spanning [0, W] x [0, H], so x = xmin - 1 and
  w = xmax - xmin + 1 (detectron2's reading; a box at xmax = W ends on the image's edge).
- ``difficult`` objects become COCO crowd regions (``iscrowd: 1``): the training reader
  (drkd.data.coco) skips them, and pycocotools' COCOeval marks crowd ground truth as
  ignored, so a detection on one is neither a true nor a false positive; VOC's own
  evaluation treats difficult objects the same way. One difference: COCOeval matches a
  detection to a crowd region by the share of the detection inside it (not IoU), so a small
  detection inside a large difficult box is ignored where VOC's script would count it as
  a false positive.
- Boxes with xmax <= xmin or ymax <= ymin as written (a click, not a drag, in the
  labelling tool) are dropped as ``degenerate``; boxes reaching outside the image are
  clipped to it, and dropped when nothing (under 1 px) is left (drkd.data.validate.clip_box,
  the rule the COCO reader uses too). All counted in stats.json.
- <size>: the boxes were drawn on an image of that size. When it matches the file (or the
  file as its EXIF orientation shows it), it is kept; when it is missing or 0 (some tools
  write 0x0) the file's size is used and counted; any other disagreement is an error, since
  the boxes' frame is then unknown and training on them would teach misplaced boxes.
- Bad input is one ``UserError`` line naming the file (and object) at fault: a split id
  without its XML or image, an unreadable XML or one whose root is not <annotation>, a split
  file that is not UTF-8, two ids whose XMLs name one image, a missing or non-numeric box
  field, a class outside ``classes`` (unless ``ignore_unknown_classes``, which skips and
  counts it). A validation id that is also a training id is refused by ``prepare``.
- An XML without objects keeps its image, with no annotations.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drkd.config import UserError, VocConfig
from drkd.data.validate import clip_box, image_size

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class VocObject:
    name: str
    difficult: bool
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax as written (1-based)


@dataclass(frozen=True)
class VocAnnotation:
    """One parsed Annotations/<id>.xml."""

    path: Path
    filename: str  # <filename>, "" when absent
    size: tuple[int, int] | None  # <size> (width, height); None when missing or 0
    objects: tuple[VocObject, ...]


def split_file(root: Path, split: str) -> Path:
    return root / "ImageSets" / "Main" / f"{split}.txt"


def read_split(path: Path) -> list[str]:
    """Image ids of a split file in file order (first word of each line, as in VOC's
    per-class lists ``<id> 1``)."""
    try:  # utf-8-sig: a byte-order mark (Windows editors) is not part of the first id
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read split file: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    ids = [line.split()[0] for line in lines if line.strip()]
    if not ids:
        raise UserError(f"{path}: lists no images")
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            raise UserError(f"{path}: image {image_id} is listed twice")
        seen.add(image_id)
    return ids


def _number(path: Path, where: str, text: str | None) -> float:
    """A finite number from an XML field, else one UserError naming file and field."""
    if text is None or not text.strip():
        raise UserError(f"{path}: {where} missing")
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{path}: {where} must be a number, got {text.strip()!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{path}: {where} must be a finite number, got {text.strip()!r}")
    return value


def read_annotation(path: Path) -> VocAnnotation:
    """Parse one VOC XML (only what detection needs: <filename>, <size>, <object>s)."""
    try:
        root = ET.parse(path).getroot()
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror or err}") from None
    except ET.ParseError as err:
        raise UserError(f"{path}: not valid XML ({err})") from None
    if root.tag != "annotation":  # another tool's XML would read as an image without objects
        raise UserError(f"{path}: not a Pascal VOC annotation (its root element is "
                        f"<{root.tag}>, not <annotation>)")
    size: tuple[int, int] | None = None
    width, height = root.findtext("size/width"), root.findtext("size/height")
    if width is not None and width.strip() and height is not None and height.strip():
        w = _number(path, "<size>/<width>", width)
        h = _number(path, "<size>/<height>", height)
        if w > 0 and h > 0:
            size = (int(w), int(h))
    objects = []
    # Direct <object> children only: VOC's person layout nests <part>s with their own boxes.
    for k, obj in enumerate(root.findall("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise UserError(f"{path}: object {k}: <name> missing")
        where = f"object {k} ({name})"
        difficult = obj.findtext("difficult", "0").strip() or "0"
        if difficult not in ("0", "1"):
            raise UserError(f"{path}: {where}: <difficult> must be 0 or 1, got {difficult!r}")
        xmin, ymin, xmax, ymax = (
            _number(path, f"{where}: <bndbox>/<{key}>", obj.findtext(f"bndbox/{key}"))
            for key in ("xmin", "ymin", "xmax", "ymax")
        )
        objects.append(VocObject(name, difficult == "1", (xmin, ymin, xmax, ymax)))
    filename = (root.findtext("filename") or "").strip()
    return VocAnnotation(path, filename, size, tuple(objects))


def find_image(root: Path, image_id: str, ann: VocAnnotation, listed_in: Path) -> Path:
    """JPEGImages/<id>.jpg as in VOC, else the XML's <filename>, else <id>.jpeg / .png."""
    folder = root / "JPEGImages"
    names = [f"{image_id}.jpg"]
    if ann.filename:
        names.append(Path(ann.filename).name)
    names += [f"{image_id}{suffix}" for suffix in _IMAGE_SUFFIXES[1:]]
    names = list(dict.fromkeys(names))
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"{listed_in}: image {image_id}: no image file in {folder} "
                    f"(tried {', '.join(names)})")


def _frame(ann: VocAnnotation, image: Path, counts: dict[str, Any]) -> tuple[int, int]:
    """The (width, height) the boxes were drawn in (module docstring, <size>)."""
    stored, shown = image_size(image)
    if ann.size is None:
        counts["size_from_image"] += 1
        return stored
    if ann.size in (stored, shown):
        # drkd.data.coco.load_rgb turns an EXIF-rotated file when that gives this size.
        return ann.size
    raise UserError(
        f"{ann.path}: <size> is {ann.size[0]}x{ann.size[1]} but {image} is "
        f"{stored[0]}x{stored[1]}: the boxes' frame is unknown (fix <size> or the image)"
    )


def class_names(annotations: list[VocAnnotation]) -> list[str]:
    """Every object class in ``annotations``, sorted (the ids when ``classes`` is empty)."""
    return sorted({obj.name for ann in annotations for obj in ann.objects})


def convert_split(
    root: Path,
    listed_in: Path,
    ids: list[str],
    annotations: list[VocAnnotation],
    classes: list[str],
    ignore_unknown_classes: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One split as a COCO dict (image ids 1..N in split order, category ids 1..K in
    ``classes`` order, absolute image paths: nothing is copied) and its counts for stats.json:
    ``dropped_boxes`` {clipped, degenerate, outside, unknown_class}, ``difficult`` (kept as
    crowd), ``size_from_image``."""
    category_of = {name: i + 1 for i, name in enumerate(classes)}
    dropped = {"clipped": 0, "degenerate": 0, "outside": 0, "unknown_class": 0}
    counts: dict[str, Any] = {"dropped_boxes": dropped, "difficult": 0, "size_from_image": 0}
    images: list[dict[str, Any]] = []
    out_annotations: list[dict[str, Any]] = []
    read_by: dict[Path, str] = {}
    for image_id, (voc_id, ann) in enumerate(zip(ids, annotations, strict=True), start=1):
        image = find_image(root, voc_id, ann, listed_in)
        resolved = image.resolve()
        if resolved in read_by:  # two XMLs whose <filename> names one file
            raise UserError(f"{listed_in}: images {read_by[resolved]} and {voc_id}: "
                            f"both read {image}")
        read_by[resolved] = voc_id
        width, height = _frame(ann, image, counts)
        images.append(
            {"id": image_id, "file_name": str(resolved), "width": width, "height": height}
        )
        for k, obj in enumerate(ann.objects, start=1):
            if obj.name not in category_of:
                if ignore_unknown_classes:
                    dropped["unknown_class"] += 1
                    continue
                raise UserError(
                    f"{ann.path}: object {k}: class {obj.name!r} is not in data.voc.classes "
                    f"({', '.join(classes)}); set data.voc.ignore_unknown_classes: true to skip it"
                )
            xmin, ymin, xmax, ymax = obj.box
            if xmax <= xmin or ymax <= ymin:
                dropped["degenerate"] += 1
                continue
            bbox, event = clip_box([xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1],
                                   width, height)
            if event is not None:
                dropped[event] += 1
            if bbox is None:
                continue
            counts["difficult"] += int(obj.difficult)
            out_annotations.append(
                {
                    "id": len(out_annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_of[obj.name],
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": int(obj.difficult),  # ignored region: module docstring
                }
            )
    categories = [{"id": i, "name": name} for name, i in category_of.items()]
    return {"images": images, "annotations": out_annotations, "categories": categories}, counts


def voc_to_coco(cfg: VocConfig) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Both splits of ``cfg`` -> {"train": (coco, counts), "val": (coco, counts)}.

    Every XML the two split files list is read (when ``classes`` is empty the class names
    come from all of them, so a smaller ``max_images`` never renumbers the categories);
    ``max_images`` > 0 converts the first N ids of each split.
    """
    root = Path(cfg.root)
    if not (root / "Annotations").is_dir():
        raise UserError(f"data.voc.root: {root} has no Annotations folder (not a VOC dataset)")
    parsed: dict[str, tuple[list[str], list[VocAnnotation]]] = {}
    for split, name in (("train", cfg.train_split), ("val", cfg.val_split)):
        listed_in = split_file(root, name)
        ids = read_split(listed_in)
        annotations = []
        for voc_id in ids:
            xml = root / "Annotations" / f"{voc_id}.xml"
            if not xml.is_file():
                raise UserError(f"{listed_in}: image {voc_id}: annotation file not found: {xml}")
            annotations.append(read_annotation(xml))
        parsed[split] = (ids, annotations)
    classes = list(cfg.classes) or class_names(
        [ann for _, annotations in parsed.values() for ann in annotations]
    )
    if not classes:
        raise UserError(f"{root}: no <object> in any annotation of the two splits")
    out = {}
    for split, name in (("train", cfg.train_split), ("val", cfg.val_split)):
        ids, annotations = parsed[split]
        keep = cfg.max_images or len(ids)
        out[split] = convert_split(
            root,
            split_file(root, name),
            ids[:keep],
            annotations[:keep],
            classes,
            cfg.ignore_unknown_classes,
        )
    return out
