"""The embedded default dataset: cluttered textured scenes of 8 shape classes, in COCO format.

Deterministic: the same config and seed give byte-identical json and PNG files.
Each image holds several instances (often several of one class) with sizes spread
over COCO's small / medium / large buckets, random colours (the class is the
shape, not the colour), partial occlusion, and unannotated distractors (lines,
dots, zig-zags) on a noisy gradient background, so foreground is a minority of
pixels and a detector must learn shape, not colour.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from drkd.config import SyntheticConfig

SIZE_MIX = (0.7, 0.27, 0.03)
CLASSES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "hexagon")


def _regular_polygon(
    cx: float, cy: float, rx: float, ry: float, n: int, phase: float
) -> list[tuple[float, float]]:
    return [
        (
            cx + rx * math.cos(phase + 2 * math.pi * k / n),
            cy + ry * math.sin(phase + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    name: str,
    box: tuple[float, float, float, float],
    fill: tuple[int, int, int],
    background: tuple[int, int, int],
) -> None:
    """Draw ``name`` so that it touches all four sides of ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    if name == "circle":
        draw.ellipse(box, fill=fill)
    elif name == "square":
        draw.rectangle(box, fill=fill)
    elif name == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif name == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif name == "cross":
        tx, ty = rx / 3, ry / 3
        draw.rectangle((cx - tx, y0, cx + tx, y1), fill=fill)
        draw.rectangle((x0, cy - ty, x1, cy + ty), fill=fill)
    elif name == "star":
        outer = _regular_polygon(cx, cy, rx, ry, 5, -math.pi / 2)
        inner = _regular_polygon(cx, cy, rx * 0.45, ry * 0.45, 5, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=True) for p in pair], fill=fill)
    elif name == "ring":
        draw.ellipse(box, fill=fill)
        draw.ellipse((cx - rx * 0.5, cy - ry * 0.5, cx + rx * 0.5, cy + ry * 0.5), fill=background)
    elif name == "hexagon":
        draw.polygon(_regular_polygon(cx, cy, rx, ry, 6, 0.0), fill=fill)
    else:  # pragma: no cover - CLASSES is closed
        raise ValueError(name)


def _shape_bbox(name: str, box: tuple[float, float, float, float]) -> list[float]:
    """The tight COCO bbox [x, y, w, h] of a drawn shape (polygons may not fill the box)."""
    x0, y0, x1, y1 = box
    if name in ("star", "hexagon"):
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        n, phase = (5, -math.pi / 2) if name == "star" else (6, 0.0)
        pts = _regular_polygon(cx, cy, rx, ry, n, phase)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A low-frequency colour gradient plus pixel noise and faint blotches: texture, not objects."""
    base = rng.integers(40, 216, size=3)
    tilt = rng.normal(0, 40, size=(2, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    img = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]
    coarse = rng.normal(0, 14, size=(size // 16 + 1, size // 16 + 1, 3))
    img = img + np.kron(coarse, np.ones((16, 16, 1)))[:size, :size]
    img = img + rng.normal(0, 10, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    while True:
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour.astype(int) - background.astype(int)).sum() > 150:
            return (int(colour[0]), int(colour[1]), int(colour[2]))


def _occlusion_ok(
    box: list[float], boxes: list[list[float]], hidden: list[float], limit: float = 0.35
) -> bool:
    """A new box is drawn on top: it may hide at most ``limit`` of each earlier box in total."""
    x, y, w, h = box
    extra = []
    for (bx, by, bw, bh), already in zip(boxes, hidden, strict=True):
        iw = max(0.0, min(x + w, bx + bw) - max(x, bx))
        ih = max(0.0, min(y + h, by + bh) - max(y, by))
        extra.append(iw * ih)
        if already + iw * ih > limit * bw * bh:
            return False
    for i, value in enumerate(extra):
        hidden[i] += value
    return True


def _distractors(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    size: int,
    count: int,
    background: np.ndarray,
) -> None:
    """Unannotated clutter: lines, dots and zig-zags that look like none of the classes."""
    for _ in range(count):
        colour = _contrasting_colour(rng, background)
        kind = rng.integers(0, 3)
        if kind == 0:
            x0, y0, x1, y1 = rng.uniform(0, size, size=4).tolist()
            draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(1, 3)))
        elif kind == 1:
            cx, cy = rng.uniform(0, size, size=2)
            r = rng.uniform(1, 2.5)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            x, y = rng.uniform(0, size, size=2)
            step = rng.uniform(3, 8)
            zigzag = [(x + i * step, y + (i % 2) * step) for i in range(int(rng.integers(3, 7)))]
            draw.line(zigzag, fill=colour, width=1)


def make_image(
    rng: np.random.Generator, cfg: SyntheticConfig
) -> tuple[Image.Image, list[tuple[int, list[float]]]]:
    """One scene and its annotations as (class index, [x, y, w, h]) pairs."""
    size = cfg.image_size
    pixels = _background(rng, size)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    mean_bg = pixels.reshape(-1, 3).mean(0)
    _distractors(draw, rng, size, cfg.distractors // 2, mean_bg)
    annotations: list[tuple[int, list[float]]] = []
    boxes: list[list[float]] = []
    hidden: list[float] = []
    # Repeating a class inside one image is common: draw from a few classes per image.
    image_classes = rng.choice(len(CLASSES), size=int(rng.integers(2, 5)), replace=False)
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    # COCO-like size mix (small < 32 px side < medium < 96 px < large), largest drawn first.
    buckets = rng.choice(3, size=count, p=SIZE_MIX)
    for bucket in sorted(buckets, reverse=True):
        # The bucket's sides within [min_object_size, max_object_size]: a bucket outside that
        # range draws at its nearer bound, never past it.
        lo, hi = (math.log(min(max(side, cfg.min_object_size), cfg.max_object_size))
                  for side in ((0, 32), (32, 96), (96, cfg.max_object_size))[bucket])
        for _attempt in range(20):
            side = math.exp(rng.uniform(lo, hi))
            aspect = math.exp(rng.uniform(-0.35, 0.35))
            w, h = min(side * aspect, size), min(side / aspect, size)
            x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
            label = int(rng.choice(image_classes))
            bbox = _shape_bbox(CLASSES[label], (x0, y0, x0 + w, y0 + h))
            if _occlusion_ok(bbox, boxes, hidden):
                break
        else:
            continue
        fill = _contrasting_colour(rng, pixels[int(y0 + h / 2), int(x0 + w / 2)])
        bg = tuple(int(c) for c in pixels[int(y0 + h / 2), int(x0 + w / 2)])
        _draw_shape(draw, CLASSES[label], (x0, y0, x0 + w, y0 + h), fill, bg)  # type: ignore[arg-type]
        annotations.append((label, bbox))
        boxes.append(bbox)
        hidden.append(0.0)
    _distractors(draw, rng, size, cfg.distractors - cfg.distractors // 2, mean_bg)
    return image, annotations


def write_split(
    out_dir: Path, split: str, count: int, cfg: SyntheticConfig, seed: int
) -> dict[str, Any]:
    """Write ``images/<split>/*.png`` under ``out_dir``; return the split as a COCO dict."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in tqdm(range(count), desc=f"synthetic {split}", unit="img", leave=False):
        image, objects = make_image(rng, cfg)
        file_name = f"images/{split}/{index:06d}.png"
        image.save(out_dir / file_name, optimize=False)
        images.append(
            {
                "id": index + 1,
                "file_name": file_name,
                "width": cfg.image_size,
                "height": cfg.image_size,
            }
        )
        for label, bbox in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": label + 1,
                    "bbox": bbox,
                    "area": round(bbox[2] * bbox[3], 2),
                    "iscrowd": 0,
                }
            )
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)
        ],
    }
    return coco
