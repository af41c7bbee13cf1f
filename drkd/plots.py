"""The report's plots (PNG through ``save_figure``; each a Figure of its own, no pyplot state):
loss curves, AP by object size, detections on validation images; ``save_figure`` is also the
one PNG writer of the relation plots, the tuning study and the method comparison.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Literal

import matplotlib
import matplotlib.colors
import matplotlib.font_manager
import matplotlib.ticker
import torch
from matplotlib.figure import Figure
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes

from drkd import registry
from drkd.data.coco import CocoDetection
from drkd.files import atomic_path
from drkd.report import NOT_LOSSES, SIZE_BUCKETS


def subplots(rows: int = 1, cols: int = 1, *, figsize: tuple[float, float],
             layout: Literal["constrained"] | None = None,
             squeeze: bool = True) -> tuple[Figure, Any]:
    """``plt.subplots`` without pyplot's global state: a Figure of its own, which needs no
    backend switch and nothing closed after ``save_figure``."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def placeholder(path: Path, text: str) -> None:
    fig, ax = subplots(figsize=(4, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG atomically (a reader never sees half a plot)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def _minor_log_label(value: float, _: int) -> str:
    """Label only the 2x and 5x minor ticks of a log axis (plain numbers, not 10^x)."""
    mantissa = round(value / 10 ** math.floor(math.log10(value)))
    return f"{value:.3g}" if mantissa in (2, 5) else ""


def _log_scale_if_positive(ax: Any, values: list[float]) -> None:
    """Log-y when all values are positive; symlog (linear below the smallest positive value)
    when some are exactly 0, e.g. loss_ir over steps whose images have < 2 instances."""
    positive = [v for v in values if v > 0]
    if not positive or min(values) < 0:
        return
    if len(positive) == len(values):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_minor_log_label))
    else:
        ax.set_yscale("symlog", linthresh=min(positive))


def plot_loss_curves(histories: dict[str, dict[str, list[float]]], path: Path) -> None:
    """One subplot per history: the total ``loss`` (thick) and each detection term; a history
    with distillation terms (loss_pr, loss_ir, loss_ins, loss_mimic; weighted, as trained) gets
    a second subplot with those on their own scale. Log-y when all values are positive."""
    if not histories:
        placeholder(path, "no training histories given")
        return
    panels: list[tuple[str, dict[str, list[float]], list[str], bool]] = []
    for title, hist in histories.items():
        terms = [k for k in hist if k not in NOT_LOSSES]
        distill = [k for k in terms if k in registry.loss_terms()]
        panels.append((title, hist, [k for k in terms if k not in distill], True))
        if distill:
            panels.append((f"{title}: distillation terms", hist, distill, False))
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = subplots(
        rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False, layout="constrained"
    )
    for ax, (title, hist, terms, with_total) in zip(axes.flat, panels, strict=False):
        for key in terms:
            ax.plot(hist["step"], hist[key], lw=1.2, label=key)
        shown = list(terms)
        if with_total and "loss" in hist:
            ax.plot(hist["step"], hist["loss"], lw=2.5, color="black", label="loss (total)")
            shown.append("loss")
        _log_scale_if_positive(ax, [v for k in shown for v in hist[k] if not math.isnan(v)])
        ax.set(title=title, xlabel="step", ylabel="loss" if with_total else "weighted loss")
        ax.grid(alpha=0.3)
        if shown:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("Training loss")
    save_figure(fig, path)


def ap_by_size_rows(metrics: dict[str, dict[str, Any]]) -> list[tuple[str, str, float, str]]:
    """(model, bucket, AP in points, "model: bucket") long rows; buckets without ground truth
    are left out. The label column gives `dvc plots` (which colours only by revision) one bar
    per model and bucket: ``x: AP, y: label, template: bar_horizontal``."""
    return [
        (name, bucket, round(100 * m[key], 2), f"{name}: {bucket}")
        for name, m in metrics.items()
        for key, bucket in SIZE_BUCKETS.items()
        if m[key] >= 0
    ]


def write_ap_by_size_csv(metrics: dict[str, dict[str, Any]], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["model", "bucket", "AP", "label"])
        writer.writerows(ap_by_size_rows(metrics))


def plot_ap_by_size(metrics: dict[str, dict[str, Any]], path: Path) -> None:
    """Grouped bars: x = size bucket, one bar per model, value labels; n/a where no GT."""
    names = list(metrics)
    width = 0.8 / len(names)
    top = max([100 * metrics[n][k] for n in names for k in SIZE_BUCKETS] + [1.0])
    fig, ax = subplots(figsize=(2 + 1.5 * len(SIZE_BUCKETS) * max(1, len(names) / 2), 4))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(SIZE_BUCKETS))]
        values = [100 * metrics[name][k] for k in SIZE_BUCKETS]
        bars = ax.bar(xs, [max(v, 0) for v in values], width, label=name)
        ax.bar_label(bars, labels=[f"{v:.1f}" if v >= 0 else "n/a" for v in values], fontsize=8)
    ax.set_xticks(range(len(SIZE_BUCKETS)), [f"{b}\n({k})" for k, b in SIZE_BUCKETS.items()])
    ax.set(ylabel="AP@[.5:.95] (points)", title="AP by object size (val)")
    ax.set_ylim(0, min(top * 1.15, 105))
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def _colors(n: int) -> list[str]:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [matplotlib.colors.to_hex(cmap(i % cmap.N)) for i in range(n)]


def _draw(
    image: torch.Tensor,
    boxes: list[list[float]],
    labels: list[str],
    colors: list[str],
    scale: float,
) -> torch.Tensor:
    if not boxes:
        return image
    xyxy = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale
    font = matplotlib.font_manager.findfont("DejaVu Sans")  # ships with matplotlib
    return draw_bounding_boxes(
        image,
        xyxy,
        labels=labels,
        colors=colors,
        width=2,
        font=font,
        font_size=13,
        fill_labels=True,
        label_colors="white",
    )


def plot_detections(
    val_json: Path,
    detections: dict[str, list[dict[str, Any]]],
    num_images: int,
    score_thresh: float,
    path: Path,
    min_side: int = 320,
) -> None:
    """A grid: one row per val image (the first ``num_images`` by id), a ground-truth column,
    then one column per model with its detections scoring >= ``score_thresh``."""
    dataset = CocoDetection(val_json)
    count = min(num_images, len(dataset))
    if count == 0:
        placeholder(path, "no validation images to show")
        return
    name_of = dict(zip(dataset.category_ids, dataset.category_names, strict=True))
    palette = dict(zip(dataset.category_ids, _colors(len(dataset.category_ids)), strict=True))
    by_image: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for model, dets in detections.items():
        by_image[model] = {}
        for det in dets:
            if det["score"] >= score_thresh:
                by_image[model].setdefault(int(det["image_id"]), []).append(det)
    columns = ["ground truth", *detections]
    fig, axes = subplots(
        count, len(columns), figsize=(3.2 * len(columns), 3.2 * count), squeeze=False
    )
    for row in range(count):
        image, target = dataset[row]
        h, w = image.shape[-2:]
        scale = max(1.0, min_side / max(h, w))  # upscale small images so labels stay legible
        big = F.resize(torch.as_tensor(image), [round(h * scale), round(w * scale)], antialias=True)
        cats = [dataset.category_ids[int(lbl) - 1] for lbl in target["labels"]]
        panels = [
            _draw(
                big,
                torch.as_tensor(target["boxes"]).tolist(),
                [name_of[c] for c in cats],
                [palette[c] for c in cats],
                scale,
            )
        ]
        for model in detections:
            dets = by_image[model].get(int(target["image_id"]), [])
            dets = sorted(dets, key=lambda d: d["score"])  # best drawn last, on top
            boxes = [[x, y, x + bw, y + bh] for x, y, bw, bh in (d["bbox"] for d in dets)]
            labels = [
                f"{name_of.get(d['category_id'], d['category_id'])} {d['score']:.2f}" for d in dets
            ]
            colors = [palette.get(d["category_id"], "#ffffff") for d in dets]
            panels.append(_draw(big, boxes, labels, colors, scale))
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(panel.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col])
            if col == 0:
                ax.set_ylabel(f"image {int(target['image_id'])}")
    fig.suptitle(f"Validation detections (score >= {score_thresh:g})")
    fig.tight_layout()
    save_figure(fig, path)
