"""The leaderboard of a comparison: every finished compare cell (compare/cells/ROW-sSEED/:
metrics.json + cost.json) summarised per row, as leaderboard.json, leaderboard.md and
leaderboard.png, with cells.csv: every cell's metrics and cost in one table (a study's record;
the board can be rebuilt from it).

Per row: AP mean and per seed, APs/APm/APl, the seed spread, the paired per-seed difference to
the best row, the share of the teacher-baseline gap closed, and step time and peak memory
relative to the baseline student. The cells never import this module, so restyling the board
reruns only the board (compare/dvc.yaml's `leaderboard` stage).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import scipy.stats

from drkd.config import UserError, flatten, load_params
from drkd.files import require_files, write_json, write_text
from drkd.plots import save_figure, subplots
from drkd.report import gap_closed, points

STATS = ("AP", "AP50", "APs", "APm", "APl")


TABLE = ("row", "seed", "method", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "steps",
         "train_seconds", "seconds_per_step", "peak_memory_mb", "threads", "compare_id",
         "overrides")


def read_cells(cells: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """row -> seed -> {metrics..., cost...} of every finished cell: the cell folders under
    ``cells`` (metrics.json + cost.json), or a study's compact table (``cells.csv``)."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    if cells.suffix == ".csv":
        require_files([cells])
        with cells.open() as fh:
            for line in csv.DictReader(fh):
                cell: dict[str, Any] = {k: v for k, v in line.items() if v != ""}
                cell["overrides"] = json.loads(cell.get("overrides", "{}"))
                for key in set(cell) - {"row", "method", "compare_id", "overrides"}:
                    text = cell[key]
                    cell[key] = int(text) if text.lstrip("-").isdigit() else float(text)
                out.setdefault(line["row"], {})[int(line["seed"])] = cell
        return out
    for cost_file in sorted(cells.glob("*/cost.json")):
        cost = json.loads(cost_file.read_text())
        metrics = json.loads((cost_file.parent / "metrics.json").read_text())
        row = cost.get("row", cost["method"])  # cells written before rows had only a method
        out.setdefault(row, {})[int(cost["seed"])] = {**metrics, **cost}
    return out


def cells_table(cells: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Every cell's metrics and cost in one CSV (``TABLE``'s columns, a row per cell): what a
    study keeps in git instead of a folder per cell; ``read_cells`` reads it back."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, TABLE, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row, seeds in cells.items():
        for seed, cell in sorted(seeds.items()):
            writer.writerow({**cell, "row": row, "seed": seed,
                             "overrides": json.dumps(cell.get("overrides", {}), sort_keys=True)})
    return buffer.getvalue()


def mean_points(values: list[float | None]) -> float | None:
    """The mean of the seeds that have the stat (on one val set: all or none)."""
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def summarise(cells: dict[str, dict[int, dict[str, Any]]],
              teacher: dict[str, Any] | None) -> dict[str, Any]:
    """Per row: per-seed and mean stats (AP points), spread, gap closed, cost ratios."""
    rows: dict[str, Any] = {}
    for name, seeds in cells.items():
        per_seed: dict[int, dict[str, Any]] = {  # AP is never None: val has ground truth
            s: {k: points(r[k]) for k in STATS} for s, r in sorted(seeds.items())}
        aps = [r["AP"] for r in per_seed.values()]
        first = seeds[min(seeds)]
        rows[name] = {
            "method": first["method"],
            "overrides": first.get("overrides", {}),
            "seeds": list(per_seed),
            "per_seed": per_seed,
            "mean": {k: mean_points([r[k] for r in per_seed.values()]) for k in STATS},
            "spread": max(aps) - min(aps) if len(aps) > 1 else None,  # one seed: no spread
            "seconds_per_step": statistics.mean(r["seconds_per_step"] for r in seeds.values()),
            "peak_memory_mb": max(r["peak_memory_mb"] for r in seeds.values()),
        }
    # The baseline: the row `none`, else any row that trains the plain student.
    base = rows.get("none") or next((r for r in rows.values() if r["method"] == "none"), None)
    for row in rows.values():
        if base is None:
            continue
        row["step_time_vs_baseline"] = row["seconds_per_step"] / base["seconds_per_step"]
        row["memory_vs_baseline"] = row["peak_memory_mb"] / base["peak_memory_mb"]
        # Over the seeds both ran: means over different seeds can differ in sign from every
        # per-seed difference (a board of unfinished cells).
        shared = sorted(set(row["per_seed"]) & set(base["per_seed"]))
        if not shared:
            continue
        row_ap, base_ap = (statistics.mean(r["per_seed"][s]["AP"] for s in shared)
                           for r in (row, base))
        row["gain"] = row_ap - base_ap
        # None on a teacher-baseline tie: no gap to close (the table prints "-", not 0%).
        row["gap_closed"] = (gap_closed(row_ap / 100, base_ap / 100, teacher["AP"])
                             if teacher else None)
    # Paired against the best row: same seed = same data order, so a per-seed difference
    # cancels what the seed does to both; below on every seed says more than the means do.
    # Among the rows with the most seeds: a row of one lucky finished seed would otherwise lead
    # and leave every other row a single difference without an interval.
    most = max(len(r["seeds"]) for r in rows.values())
    top = max((r for r in rows.values() if len(r["seeds"]) == most), key=lambda r: r["mean"]["AP"])
    for row in rows.values():
        diffs = {s: row["per_seed"][s]["AP"] - top["per_seed"][s]["AP"]
                 for s in sorted(set(row["per_seed"]) & set(top["per_seed"]))}
        row["vs_top"] = None
        if row is not top:
            row["vs_top"] = {"per_seed": diffs,
                             "mean": statistics.mean(diffs.values()) if diffs else None,
                             **paired_interval(list(diffs.values()))}
    summary = {"teacher_AP": 100 * teacher["AP"] if teacher else None, "methods": rows}
    ids = Counter(c["compare_id"] for seeds in cells.values() for c in seeds.values()
                  if c.get("compare_id"))
    if len(ids) > 1:  # cells of different data, teacher file, student recipe or launcher
        summary["compare_ids"] = dict(ids.most_common())
    return summary


def side_by_side(summary: dict[str, Any], path: Path) -> None:
    """Step-time ratios from one run that timed every method or row in turn
    (python -m benchmarks.distill_cost --rows none ... --out FILE) in place of the cells'
    own, which ran hours apart on a machine whose speed drifts. A row timed there under its own
    name shows its own; another variant row shows its method's, unless it adds other methods'
    terms (`plus`: its step costs more than its method's); a row not timed there shows none."""
    require_files([path])
    times = json.loads(path.read_text()).get("seconds_per_step")
    if not isinstance(times, dict) or not times.get("none"):
        raise UserError(f"{path}: expected seconds_per_step with a `none` entry "
                        "(python -m benchmarks.distill_cost --rows none ... --out)")
    for name, row in summary["methods"].items():
        row.pop("step_time_vs_baseline", None)
        combined = bool(row.get("overrides", {}).get("plus"))
        timed_as = name if name in times or combined else row["method"]
        if timed_as in times:
            row["step_time_vs_baseline"] = times[timed_as] / times["none"]
    summary["step_times"] = str(path)


def ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "-"


def paired_interval(diffs: list[float]) -> dict[str, Any]:
    """The 95% interval of the mean of paired per-seed differences (Student's t over the seeds:
    the seed is what a rerun changes, so it is the unit of noise) and whether it covers 0
    ("within noise"); no interval from fewer than 2 seeds."""
    if len(diffs) < 2:
        return {"ci95": None, "within_noise": None}
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = float(scipy.stats.t.ppf(0.975, len(diffs) - 1)) * sd / len(diffs) ** 0.5
    return {"ci95": [mean - half, mean + half], "within_noise": mean - half <= 0 <= mean + half}


def vs_top(row: dict[str, Any]) -> str:
    """`-0.6 [-1.2, -0.1] (-1.0..-0.2)`: the mean per-seed difference to the best row, its 95%
    interval ("within noise" when it covers 0) and the range of the differences."""
    diffs = list(row["vs_top"]["per_seed"].values()) if row["vs_top"] else []
    if not diffs:
        return "-"  # the best row itself, or no seed in common with it
    if len(diffs) == 1:
        return f"{diffs[0]:+.1f}"
    low, high = row["vs_top"]["ci95"]
    noise = ", within noise" if row["vs_top"]["within_noise"] else ""
    return (f"{row['vs_top']['mean']:+.1f} [{low:+.1f}, {high:+.1f}]{noise} "
            f"({min(diffs):+.1f}..{max(diffs):+.1f})")


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| row | seeds | AP (mean) | AP per seed | spread | vs best, paired | AP50 | APs | "
             "APm | APl | gain | gap closed | step time | memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ranked = sorted(summary["methods"].items(), key=lambda kv: -kv[1]["mean"]["AP"])
    for name, row in ranked:
        m = row["mean"]
        seeds = ", ".join(f"{r['AP']:.1f}" for r in row["per_seed"].values())
        gap = "-" if row.get("gap_closed") is None else f"{100 * row['gap_closed']:.0f}%"
        gain = f"{row['gain']:+.1f}" if "gain" in row else "-"
        spread = "-" if row["spread"] is None else f"{row['spread']:.1f}"
        lines.append(
            f"| {name} | {len(row['seeds'])} | **{m['AP']:.1f}** | {seeds} | "
            f"{spread} | {vs_top(row)} | "
            + " | ".join("-" if m[k] is None else f"{m[k]:.1f}" for k in STATS[1:])
            + f" | {gain} | {gap} | {ratio(row, 'step_time_vs_baseline')} | "
            f"{ratio(row, 'memory_vs_baseline')} |")
    teacher = summary["teacher_AP"]
    head = f"Teacher AP {teacher:.1f}. " if teacher is not None else ""
    note = (f"{head}AP in points on val; spread = max - min over seeds; vs best, paired = the "
            "row's AP minus the best row's on the same seed: mean [95% interval, Student's t over "
            "the seeds both ran; \"within noise\" when it covers 0] (min..max); gain and gap "
            "closed against `none` (the baseline student), over the seeds both ran; step time "
            "and peak memory relative to it"
            + (f" (step time: every method timed side by side, {summary['step_times']}; a "
               "variant row not timed under its own name shows its method's, one adding other "
               "methods' terms none)."
               if summary.get("step_times") else
               " (step time: the cells' own, which may have run hours apart)."))
    variants = [f"- {name}: {row['method']} with " + ", ".join(
        f"{k}={v}" for k, v in flatten(row["overrides"]).items() if k != "method")
        for name, row in ranked if set(row["overrides"]) - {"method"}]
    tail = "\n\nRows with overrides of `distill`:\n" + "\n".join(variants) if variants else ""
    if summary.get("compare_ids"):
        tail += ("\n\nThe cells come from " + str(len(summary["compare_ids"])) + " comparisons "
                 "(compare_id: cells " + ", ".join(f"{k}: {v}" for k, v in
                                                   summary["compare_ids"].items())
                 + "): their data, teacher file, student recipe or launcher differ.")
    return note + "\n\n" + "\n".join(lines) + tail + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Three panels, best row first: AP mean (bar) and each seed (dots) with the teacher as a
    line; mean APs / APm / APl; mean AP against step time relative to the baseline."""

    ranked = sorted(summary["methods"].items(), key=lambda kv: -kv[1]["mean"]["AP"])
    names = [name for name, _ in ranked]
    x = range(len(ranked))
    fig, (ap, sizes, cost) = subplots(1, 3, figsize=(1.6 * max(len(ranked), 3) + 6, 4.5))
    for i, (_, row) in enumerate(ranked):
        ap.bar(i, row["mean"]["AP"], color="tab:gray" if row["method"] == "none" else "tab:blue")
        ap.scatter([i] * len(row["per_seed"]), [r["AP"] for r in row["per_seed"].values()],
                   color="black", s=12, zorder=3)
    if summary["teacher_AP"] is not None:
        ap.axhline(summary["teacher_AP"], color="tab:red", ls="--", label="teacher")
        ap.legend()
    ap.set_title("AP: mean over seeds (bars), each seed (dots)")
    for offset, key in zip((-0.27, 0.0, 0.27), ("APs", "APm", "APl"), strict=True):
        heights = [row["mean"][key] for _, row in ranked]  # None: no object of that size
        sizes.bar([i + offset for i in x], [math.nan if h is None else h for h in heights], 0.27,
                  label=key)
    sizes.legend()
    sizes.set_title("AP by object size (mean over seeds)")
    for axis in (ap, sizes):
        axis.set_xticks(x, names, rotation=30, ha="right")
        axis.set_ylabel("val AP (points)")
    timed = [(name, row) for name, row in ranked if "step_time_vs_baseline" in row]
    placed: list[tuple[float, float]] = []
    for name, row in timed:
        point = (row["step_time_vs_baseline"], row["mean"]["AP"])
        # Rows of about the same cost and AP (tuned variants of one method) would print their
        # names on top of each other: each name near an earlier one goes one line lower.
        near = sum(abs(point[0] - x) < 0.08 and abs(point[1] - y) < 1.5 for x, y in placed)
        placed.append(point)
        cost.scatter(*point, color="tab:blue")
        cost.annotate(name, point, fontsize=8, xytext=(4, 2 - 10 * near),
                      textcoords="offset points")
    cost.set_xlabel("train step time / baseline student's")
    cost.set_ylabel("mean val AP (points)")
    cost.set_title("AP against training cost")
    fig.tight_layout()
    save_figure(fig, path)


def write_board(cells_dir: Path, out: Path, params_file: Path | None = None,
                teacher_metrics: Path | None = None, step_times: Path | None = None) -> str:
    """Summarise the finished cells under ``cells_dir`` (only those of ``params_file``'s
    compare.methods x seeds when given) into ``out``/leaderboard.{json,md,png}; returns the
    markdown."""
    cells = read_cells(cells_dir)
    if params_file:  # only the cells params asks for: a removed row or seed keeps its folder
        wanted = load_params(params_file).compare
        cells = {row: {seed: cell for seed, cell in seeds.items() if seed in wanted.seeds}
                 for row, seeds in cells.items() if row in wanted.methods}
        cells = {row: seeds for row, seeds in cells.items() if seeds}
    if not cells:
        raise UserError(f"{cells_dir}: no finished cell (cost.json + metrics.json)")
    teacher = None
    if teacher_metrics and teacher_metrics.is_file():
        teacher = json.loads(teacher_metrics.read_text())
    summary = summarise(cells, teacher)
    if summary.get("compare_ids"):
        print(f"[leaderboard] warning: cells from {len(summary['compare_ids'])} comparisons "
              f"(compare_id: cells {summary['compare_ids']}); the board says so")
    if step_times:
        side_by_side(summary, step_times)
        # Named from the board's folder, so a board moved with its records still points at it.
        summary["step_times"] = os.path.relpath(step_times.resolve(), out.resolve())
    write_json(summary, out / "leaderboard.json")
    write_text(cells_table(cells), out / "cells.csv")
    text = markdown(summary)
    write_text(text, out / "leaderboard.md")
    plot(summary, out / "leaderboard.png")
    return text
