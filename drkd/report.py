"""The `report` stage's parts: json I/O, the summary, the markdown table (the plots are in
drkd/plots.py, the stage's run in drkd/report_stage.py).

Works for any list of model names: the first one is the reference for ``gap_to_first`` (the
teacher), the second the baseline (the plain student) that every later model (e.g. the DRKD
student) is compared with in ``gain_over_<second>`` and ``gap_closed``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from drkd.config import UserError
from drkd.files import require_files
from drkd.tracking import mlflow_name

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")  # fractions 0..1, -1 = no such GT
SIZE_BUCKETS = {"AP": "all", "APs": "small", "APm": "medium", "APl": "large"}
# Loss-history columns that are not loss terms.
NOT_LOSSES = ("step", "loss", "lr", "epoch", "seconds", "peak_memory_mb", "threads")


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
    if 100 * (reference_ap - baseline_ap) < 0.1:  # the gap itself, not its rounded ends
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


def points(value: float) -> float | None:
    """A COCO stat in points; None for -1, pycocotools' "no ground truth of this size"."""
    return None if value < 0 else 100 * value


def _points(value: float) -> str:
    p = points(value)
    return "-" if p is None else f"{p:.1f}"


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
        escaped = cls.replace("|", r"\|")  # a | would open a column
        lines.append(f"| {escaped} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_history(path: Path) -> dict[str, list[float]]:
    """A loss-history CSV (``step`` + loss columns) as {column: values}; a header alone is the
    history of a run of 0 steps (a teacher given trained): {"step": []}."""
    require_files([path])
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        columns = reader.fieldnames or []
    if "step" not in columns:
        raise UserError(f"{path}: not a loss history (needs a 'step' column)")
    return {
        key: [float(r[key]) if r[key] not in ("", None) else math.nan for r in rows]
        for key in columns
    }
