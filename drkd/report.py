"""Helpers of the `evaluate` and `report` stages: json I/O, the summary, the markdown table, plots.

Works for any list of model names: the first one is the reference for ``gap_to_first`` (the
teacher), the second the baseline (the plain student) that every later model (e.g. the DRKD
student) is compared with in ``gain_over_<second>`` and ``gap_closed``. Plots use
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors  # noqa: E402
import matplotlib.font_manager  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402
from torchvision.transforms.v2 import functional as F  # noqa: E402
from torchvision.utils import draw_bounding_boxes  # noqa: E402

from drkd.config import UserError  # noqa: E402
from drkd.data.coco import CocoDetection  # noqa: E402
from drkd.files import atomic_path, require_files  # noqa: E402
from drkd.tracking import mlflow_name  # noqa: E402

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")  # fractions 0..1, -1 = no such GT
SIZE_BUCKETS = {"AP": "all", "APs": "small", "APm": "medium", "APl": "large"}
# The Distiller's loss terms, every method (drkd.methods).
DISTILL_TERMS = ("loss_pr", "loss_ir", "loss_ins", "loss_mimic", "loss_pkd", "loss_cwd",
                 "loss_mgd", "loss_fgd_fg", "loss_fgd_bg", "loss_fgd_att", "loss_fgd_global")
NOT_LOSSES = ("step", "loss", "lr", "epoch")  # loss-history columns that are not loss terms


def read_json(path: Path) -> Any:
    require_files([path])
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid json ({err.msg}, line {err.lineno})") from None


def read_metrics(path: Path) -> dict[str, Any]:
    """An evaluate stage's metrics json, checked for every key the report uses."""
    metrics = read_json(path)
    need = (*METRICS, "per_class_AP", "parameters", "inference_ms_per_image")
    missing = [k for k in need if not isinstance(metrics, dict) or k not in metrics]
    if missing:
        raise UserError(f"{path}: not an evaluate metrics file (missing {', '.join(missing)})")
    return dict(metrics)


# ---------------------------------------------------------------- summary and table


def _deltas(row: dict[str, Any], ref: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """row - ref per key; null where either is -1 (the split has no ground truth of that size)."""
    return {k: None if -1 in (row[k], ref[k]) else round(row[k] - ref[k], 6) for k in keys}


def gap_closed(model_ap: float, baseline_ap: float, reference_ap: float) -> float | None:
    """(AP_model - AP_baseline) / (AP_reference - AP_baseline): the fraction of the
    teacher-student gap a distilled student closes (1 = reaches the teacher, < 0 = worse than
    the plain student). None when the reference does not beat the baseline by at least the
    0.1 AP point the report prints: a gap that reads as a tie (two barely trained smoke-run
    models, 1e-5 AP apart) would give "0%" or "-5000%", a number that means nothing."""
    if -1 in (model_ap, baseline_ap, reference_ap):
        return None
    if round(100 * reference_ap, 1) <= round(100 * baseline_ap, 1):
        return None
    return round((model_ap - baseline_ap) / (reference_ap - baseline_ap), 6)


def summarize(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{model: {AP.., parameters, inference_ms_per_image}}; every model after the first also
    gets ``gap_to_first``: its value minus the first model's, per number (null where either
    is -1, i.e. the split has no ground truth of that size). Every model after the second
    (``--models teacher student student_drkd``) also gets ``gain_over_<second>`` (its value
    minus the second model's, per number) and ``gap_closed`` (see :func:`gap_closed`, on AP;
    null when the first model's AP does not exceed the second's)."""
    keys = (*METRICS, "parameters", "inference_ms_per_image")
    summary = {name: {k: m[k] for k in keys} for name, m in metrics.items()}
    names = list(summary)
    first = summary[names[0]]
    for row in list(summary.values())[1:]:
        row["gap_to_first"] = _deltas(row, first, keys)
    if len(names) >= 3:
        baseline = summary[names[1]]
        for name in names[2:]:
            row = summary[name]
            row[f"gain_over_{names[1]}"] = _deltas(row, baseline, keys)
            row["gap_closed"] = gap_closed(row["AP"], baseline["AP"], first["AP"])
    return summary


def headline_gain(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """The DVC metrics part of :func:`summarize`: for every model after the second, its AP gain
    over the second (``AP_gain``, a fraction like AP) and ``gap_closed`` (null when undefined);
    {} for fewer than 3 models. The rest (each model's metrics again, every delta) is in the
    full summary."""
    names = list(summary)
    return {
        name: {
            "AP_gain": summary[name][f"gain_over_{names[1]}"]["AP"],
            "gap_closed": summary[name]["gap_closed"],
        }
        for name in names[2:]
    }


def summary_numbers(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The summary flattened for MLflow: ``<model>.<key>`` (``gap_closed`` included) and
    ``<model>.<gap_to_first | gain_over_X>.<key>``; nulls are left out."""
    numbers: dict[str, float] = {}
    for model, row in summary.items():
        name = mlflow_name(model)
        numbers.update({f"{name}.{k}": v for k, v in row.items() if isinstance(v, int | float)})
        for group, deltas in row.items():
            if isinstance(deltas, dict):
                numbers.update(
                    {
                        f"{name}.{mlflow_name(group)}.{k}": v
                        for k, v in deltas.items()
                        if v is not None
                    }
                )
    return numbers


def _points(value: float) -> str:
    return "-" if value < 0 else f"{100 * value:.1f}"


def _signed_points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def gain_table(metrics: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown lines: every model after the second vs the second (AP points) and the fraction
    of the first-second AP gap it closes; no lines for fewer than 3 models."""
    names = list(metrics)
    if len(names) < 3:
        return []
    summary = summarize(metrics)
    first, baseline = names[0], names[1]
    lines = [
        "",
        f"## Gain over {baseline} (val, AP points)",
        "",
        f"`gap closed` = (AP - AP {baseline}) / (AP {first} - AP {baseline}).",
        "",
        "| model | " + " | ".join(METRICS) + f" | {first}-{baseline} AP gap closed |",
        "|---|" + "---:|" * (len(METRICS) + 1),
    ]
    for name in names[2:]:
        row = summary[name]
        gains = row[f"gain_over_{baseline}"]
        closed = "-" if row["gap_closed"] is None else f"{100 * row['gap_closed']:.0f}%"
        lines.append(
            f"| {name} | "
            + " | ".join(_signed_points(gains[k]) for k in METRICS)
            + f" | {closed} |"
        )
    return lines


def markdown_table(metrics: dict[str, dict[str, Any]]) -> str:
    """Metrics (COCO points, 1 decimal), parameters (M) and ms/image per model; with 3 or more
    models the gain of every model after the second over the second (:func:`gain_table`);
    then per-class AP. ``-`` marks a bucket without ground truth."""
    names = list(metrics)
    lines = [
        "## Detection metrics (val)",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key in METRICS:
        lines.append(f"| {key} | " + " | ".join(_points(metrics[n][key]) for n in names) + " |")
    lines.append(
        "| params (M) | "
        + " | ".join(f"{metrics[n]['parameters'] / 1e6:.2f}" for n in names)
        + " |"
    )
    lines.append(
        "| ms/image | "
        + " | ".join(f"{metrics[n]['inference_ms_per_image']:.1f}" for n in names)
        + " |"
    )
    lines += gain_table(metrics)
    classes = list(dict.fromkeys(c for n in names for c in metrics[n]["per_class_AP"]))
    lines += [
        "",
        "## Per-class AP (val)",
        "",
        "| class | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for cls in classes:
        cells = [_points(metrics[n]["per_class_AP"].get(cls, -1.0)) for n in names]
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _placeholder(path: Path, text: str) -> None:
    fig, ax = plt.subplots(figsize=(4, 1.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as a PNG atomically (a reader never sees half a plot) and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def read_history(path: Path) -> dict[str, list[float]]:
    """A loss-history CSV (``step`` + loss columns) as {column: values}."""
    require_files([path])
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "step" not in rows[0]:
        raise UserError(f"{path}: not a loss history (needs a 'step' column and rows)")
    return {
        key: [float(r[key]) if r[key] not in ("", None) else math.nan for r in rows]
        for key in rows[0]
    }


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
        _placeholder(path, "no training histories given")
        return
    panels: list[tuple[str, dict[str, list[float]], list[str], bool]] = []
    for title, hist in histories.items():
        terms = [k for k in hist if k not in NOT_LOSSES]
        distill = [k for k in terms if k in DISTILL_TERMS]
        panels.append((title, hist, [k for k in terms if k not in distill], True))
        if distill:
            panels.append((f"{title}: distillation terms", hist, distill, False))
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(
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
    fig, ax = plt.subplots(figsize=(2 + 1.5 * len(SIZE_BUCKETS) * max(1, len(names) / 2), 4))
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
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
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
        _placeholder(path, "no validation images to show")
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
    fig, axes = plt.subplots(
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
