"""`make compare`: the student of params.yaml distilled from the same teacher by every row of
``compare.methods``, for every seed in ``compare.seeds`` (``compare/dvc.yaml``, one DVC
``matrix`` stage: each cell is cached, so adding a row or a seed runs only its cells, editing a
row reruns only that row's, and a rerun with nothing changed is a no-op), then a leaderboard.
A row is a method as params.yaml sets it or a variant of one (an ablation): a name and its
overrides of the `distill` section (``drkd.config.row_distill``).

    python -m stages.compare rows --out compare/rows
    python -m stages.compare cell ROW SEED --out compare/cells/ROW-sSEED [--row-file R]
    python -m stages.compare leaderboard --cells compare/cells --out compare

``rows`` writes each row's resolved `distill` settings, only the keys its method reads
(``drkd.config.METHOD_KEYS``), to ``ROW.json``: a cell depends on its row's file, not on the
whole `distill` section, so tuning one method reruns only that method's cells and `none` no
cell's. A cell trains with the student recipe (``compare.epochs`` > 0 shortens it for every
cell alike), exactly those settings and the given seed, as ``<launcher> -m stages.distill``
like the main pipeline (torchrun: DDP); `none` is the baseline student.
It writes ``params.yaml`` (the exact values it used), ``history.csv``, ``model.pt`` (DRKD:
``modules.pt`` too), ``metrics.json`` (COCO metrics of val) and ``cost.json`` (seconds per
training step over the whole run, resumed parts
included, setup and evaluation not; the training's peak memory, rank 0's under DDP), and is
one MLflow run tagged ``row``, ``method``, ``seed`` and ``compare_id`` (a hash of what every
cell of one comparison shares: data, teacher, student recipe, budget, launcher).

The leaderboard (``leaderboard.md``, ``leaderboard.png``, ``leaderboard.json``): AP mean and
per seed per row, APs/APm/APl, the share of the teacher-baseline gap closed, and step time
and peak memory relative to the baseline student.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shlex
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from drkd import cli
from drkd.config import (
    DistillConfig,
    UserError,
    flatten,
    from_dict,
    load_params,
    method_distill,
    parse_params,
    row_distill,
    to_dict,
)
from drkd.files import require_files, write_json, write_text
from drkd.plots import save_figure  # selects the Agg backend
from drkd.report import gap_closed
from drkd.tracking import stage_run

STATS = ("AP", "AP50", "APs", "APm", "APl")


def resolved_rows(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Row name -> the `distill` settings its cells train with: params.yaml's `distill` with the
    row's overrides, every value in its canonical type (0 and 0.0 are one setting), only the
    keys the row's method reads."""
    return {
        name: method_distill(to_dict(from_dict(
            DistillConfig, row_distill(params["distill"], name, overrides), "distill")))
        for name, overrides in params["compare"]["methods"].items()
    }


def cell_params(params_file: str, row: str, seed: int) -> dict[str, Any]:
    """params.yaml as one cell trains it: its seed and its row's `distill` (``resolved_rows``;
    the keys its method does not read take their defaults); its own tracking off (the cell is
    the MLflow run)."""
    params = to_dict(load_params(params_file))
    rows = params["compare"]["methods"]
    if row not in rows:
        raise UserError(f"{params_file}: compare.methods has no row {row!r} "
                        f"(rows: {', '.join(rows)})")
    params["seed"] = seed
    params["distill"] = resolved_rows(params)[row]
    epochs = params["compare"]["epochs"]
    if epochs:
        train = params["student"]["train"]
        # The warm-up shrinks with the budget, as a share of the recipe's steps.
        train["warmup_steps"] = train["warmup_steps"] * epochs // max(train["epochs"], 1)
        train["epochs"] = epochs
    params["tracking"]["enabled"] = False
    parse_params(params)
    return params


def compare_id(params: dict[str, Any], data: Path, teacher: Path) -> str:
    """What every cell of one comparison shares (not the method, its params or the seed)."""
    digest = hashlib.md5((data / "train.json").read_bytes())
    digest.update(teacher.read_bytes())
    # The launcher too: its process count divides the steps (one batch per process).
    digest.update(json.dumps([params["student"], params["compare"]["epochs"],
                              params["launcher"]], sort_keys=True).encode())
    return digest.hexdigest()[:12]


def launch(launcher: str, stage: ModuleType, argv: list[str]) -> None:
    """``<launcher> -m <stage> argv``, as dvc.yaml runs the training stages (torchrun: DDP); the
    launcher's ``python`` is this interpreter, the one DVC found on the PATH. A SIGTERM to the
    cell (a DVC queue kill) reaches the training too; a failed training ends the cell with its
    exit code (1: diverged, 2: bad input), after its own error line."""
    command = shlex.split(launcher)
    if command[0] == "python":
        command[0] = sys.executable
    child = subprocess.Popen([*command, "-m", stage.__name__, *argv])
    previous = signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        print(f"error: {stage.__name__} under `{launcher}` {how}", file=sys.stderr)
        raise SystemExit(max(code, 1))


def run_cell(args: argparse.Namespace) -> int:
    import stages.distill
    import stages.evaluate
    import stages.train

    out, data, teacher = Path(args.out), Path(args.data), Path(args.teacher)
    params = cell_params(args.params, args.row, args.seed)
    if args.row_file:  # the cell's DVC dependency: it must be what the cell trains with
        row_file = Path(args.row_file)
        require_files([row_file])
        if json.loads(row_file.read_text()) != params["distill"]:
            raise UserError(f"{row_file}: stale, not row {args.row!r} of {args.params} "
                            "(run `dvc repro compare/dvc.yaml:rows` first)")
    require_files([data / "train.json", data / "val.json", teacher])
    method = params["distill"]["method"]
    cell_id = compare_id(params, data, teacher)
    out.mkdir(parents=True, exist_ok=True)
    write_text(json.dumps(params, indent=1) + "\n", out / "params.yaml")  # JSON is YAML
    common = ["--params", str(out / "params.yaml"), "--data", str(data)]
    work = Path("work/compare") / out.name
    train = [*common, "--out", str(out / "model.pt"),
             "--history", str(out / "history.csv"), "--work-dir", str(work)]
    user = load_params(args.params)  # the params file as given: its tracking and launcher
    tags = {"row": args.row, "method": method, "seed": str(args.seed), "compare_id": cell_id}
    with stage_run(user.tracking, f"compare_{out.name}", params, [data / "train.json"]) as run:
        run.set_tags(tags)
        if method == "none":
            launch(user.launcher, stages.train, ["student", *train])
        else:
            # DRKD's trained modules too: what its relation filter learned is measurable
            # (benchmarks/relation_filter.py).
            modules = ["--modules-out", str(out / "modules.pt")] if method == "drkd" else []
            launch(user.launcher, stages.distill, [*train, "--teacher", str(teacher), *modules])
        with (out / "history.csv").open() as fh:
            history = list(csv.DictReader(fh))
        # The step loops' time, summed over a killed run's parts, and the training's peak
        # memory over those parts (rank 0's under DDP), as drkd.engine.fit records them.
        steps, seconds = int(history[-1]["step"]), float(history[-1]["seconds"])
        cost = {"train_seconds": round(seconds, 2), "steps": steps,
                "seconds_per_step": seconds / steps,
                "peak_memory_mb": max(float(row["peak_memory_mb"]) for row in history)}
        stages.evaluate.main(["compare", *common, "--checkpoint", str(out / "model.pt"),
                              "--metrics", str(out / "metrics.json"),
                              "--detections", str(out / "detections.json")])
        metrics = json.loads((out / "metrics.json").read_text())
        overrides = params["compare"]["methods"][args.row]
        write_json({**cost, **tags, "overrides": overrides}, out / "cost.json")
        run.log_metrics({**{k: metrics[k] for k in STATS},
                         **{k: float(v) for k, v in cost.items()}})
        run.log_artifact(out / "history.csv")
    return 0


def run_rows(args: argparse.Namespace) -> int:
    out = Path(args.out)
    for name, distill in resolved_rows(to_dict(load_params(args.params))).items():
        write_json(distill, out / f"{name}.json")
    return 0


def read_cells(cells: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """row -> seed -> {metrics..., cost...} of every finished cell."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for cost_file in sorted(cells.glob("*/cost.json")):
        cost = json.loads(cost_file.read_text())
        metrics = json.loads((cost_file.parent / "metrics.json").read_text())
        row = cost.get("row", cost["method"])  # cells written before rows had only a method
        out.setdefault(row, {})[int(cost["seed"])] = {**metrics, **cost}
    return out


def summarise(cells: dict[str, dict[int, dict[str, Any]]],
              teacher: dict[str, Any] | None) -> dict[str, Any]:
    """Per row: per-seed and mean stats (AP points), spread, gap closed, cost ratios."""
    rows: dict[str, Any] = {}
    for name, seeds in cells.items():
        per_seed = {s: {k: 100 * r[k] for k in STATS} for s, r in sorted(seeds.items())}
        aps = [r["AP"] for r in per_seed.values()]
        first = seeds[min(seeds)]
        rows[name] = {
            "method": first["method"],
            "overrides": first.get("overrides", {}),
            "seeds": list(per_seed),
            "per_seed": per_seed,
            "mean": {k: statistics.mean(r[k] for r in per_seed.values()) for k in STATS},
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
        row["gain"] = row["mean"]["AP"] - base["mean"]["AP"]
        # None on a teacher-baseline tie: no gap to close (the table prints "-", not 0%).
        row["gap_closed"] = (
            gap_closed(row["mean"]["AP"] / 100, base["mean"]["AP"] / 100, teacher["AP"])
            if teacher else None
        )
    # Paired against the best row: same seed = same data order, so a per-seed difference
    # cancels what the seed does to both; below on every seed says more than the means do.
    top = max(rows.values(), key=lambda r: r["mean"]["AP"])
    for row in rows.values():
        diffs = {s: row["per_seed"][s]["AP"] - top["per_seed"][s]["AP"]
                 for s in sorted(set(row["per_seed"]) & set(top["per_seed"]))}
        row["vs_top"] = None
        if row is not top:
            row["vs_top"] = {"per_seed": diffs,
                             "mean": statistics.mean(diffs.values()) if diffs else None}
    return {"teacher_AP": 100 * teacher["AP"] if teacher else None, "methods": rows}


def side_by_side(summary: dict[str, Any], path: Path) -> None:
    """Step-time ratios from one run that timed every method in turn (benchmarks/distill_cost.py
    --methods none ... --out FILE) in place of the cells' own, which ran hours apart on a
    machine whose speed drifts. Per method at that run's settings: a variant row shows its
    method's; a method not timed there shows none."""
    require_files([path])
    times = json.loads(path.read_text()).get("seconds_per_step")
    if not isinstance(times, dict) or not times.get("none"):
        raise UserError(f"{path}: expected seconds_per_step with a `none` entry "
                        "(benchmarks/distill_cost.py --methods none ... --out)")
    for row in summary["methods"].values():
        row.pop("step_time_vs_baseline", None)
        if row["method"] in times:
            row["step_time_vs_baseline"] = times[row["method"]] / times["none"]
    summary["step_times"] = str(path)


def ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "-"


def vs_top(row: dict[str, Any]) -> str:
    """`-0.6 (-1.0..-0.2)`: mean and range of the per-seed differences to the best row."""
    diffs = list(row["vs_top"]["per_seed"].values()) if row["vs_top"] else []
    if not diffs:
        return "-"  # the best row itself, or no seed in common with it
    if len(diffs) == 1:
        return f"{diffs[0]:+.1f}"
    return f"{row['vs_top']['mean']:+.1f} ({min(diffs):+.1f}..{max(diffs):+.1f})"


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
            f"{spread} | {vs_top(row)} | {m['AP50']:.1f} | {m['APs']:.1f} | {m['APm']:.1f} | "
            f"{m['APl']:.1f} | {gain} | {gap} | {ratio(row, 'step_time_vs_baseline')} | "
            f"{ratio(row, 'memory_vs_baseline')} |")
    teacher = summary["teacher_AP"]
    head = f"Teacher AP {teacher:.1f}. " if teacher is not None else ""
    note = (f"{head}AP in points on val; spread = max - min over seeds; vs best, paired = the "
            "row's AP minus the best row's on the same seed, mean (min..max) over the seeds both "
            "ran: a range that excludes 0 is below on every seed; gain and gap closed against "
            "`none` (the baseline student); step time and peak memory relative to it"
            + (f" (step time: every method timed side by side, {summary['step_times']}; a "
               "variant row shows its method's)." if summary.get("step_times") else
               " (step time: the cells' own, which may have run hours apart)."))
    variants = [f"- {name}: {row['method']} with " + ", ".join(
        f"{k}={v}" for k, v in flatten(row["overrides"]).items() if k != "method")
        for name, row in ranked if set(row["overrides"]) - {"method"}]
    tail = "\n\nRows with overrides of `distill`:\n" + "\n".join(variants) if variants else ""
    return note + "\n\n" + "\n".join(lines) + tail + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Three panels, best row first: AP mean (bar) and each seed (dots) with the teacher as a
    line; mean APs / APm / APl; mean AP against step time relative to the baseline."""
    import matplotlib.pyplot as plt

    ranked = sorted(summary["methods"].items(), key=lambda kv: -kv[1]["mean"]["AP"])
    names = [name for name, _ in ranked]
    x = range(len(ranked))
    fig, (ap, sizes, cost) = plt.subplots(1, 3, figsize=(1.6 * max(len(ranked), 3) + 6, 4.5))
    for i, (_, row) in enumerate(ranked):
        ap.bar(i, row["mean"]["AP"], color="tab:gray" if row["method"] == "none" else "tab:blue")
        ap.scatter([i] * len(row["per_seed"]), [r["AP"] for r in row["per_seed"].values()],
                   color="black", s=12, zorder=3)
    if summary["teacher_AP"] is not None:
        ap.axhline(summary["teacher_AP"], color="tab:red", ls="--", label="teacher")
        ap.legend()
    ap.set_title("AP: mean over seeds (bars), each seed (dots)")
    for offset, key in zip((-0.27, 0.0, 0.27), ("APs", "APm", "APl"), strict=True):
        sizes.bar([i + offset for i in x], [row["mean"][key] for _, row in ranked], 0.27,
                  label=key)
    sizes.legend()
    sizes.set_title("AP by object size (mean over seeds)")
    for axis in (ap, sizes):
        axis.set_xticks(x, names, rotation=30, ha="right")
        axis.set_ylabel("val AP (points)")
    timed = [(name, row) for name, row in ranked if "step_time_vs_baseline" in row]
    for name, row in timed:
        cost.scatter(row["step_time_vs_baseline"], row["mean"]["AP"], color="tab:blue")
        cost.annotate(name, (row["step_time_vs_baseline"], row["mean"]["AP"]), fontsize=8,
                      xytext=(4, 2), textcoords="offset points")
    cost.set_xlabel("train step time / baseline student's")
    cost.set_ylabel("mean val AP (points)")
    cost.set_title("AP against training cost")
    fig.tight_layout()
    save_figure(fig, path)


def run_leaderboard(args: argparse.Namespace) -> int:
    cells = read_cells(Path(args.cells))
    if args.params:  # only the cells params asks for: a removed row or seed keeps its folder
        wanted = load_params(args.params).compare
        cells = {row: {seed: cell for seed, cell in seeds.items() if seed in wanted.seeds}
                 for row, seeds in cells.items() if row in wanted.methods}
        cells = {row: seeds for row, seeds in cells.items() if seeds}
    if not cells:
        raise UserError(f"{args.cells}: no finished cell (cost.json + metrics.json)")
    teacher_file = Path(args.teacher_metrics)
    teacher = json.loads(teacher_file.read_text()) if teacher_file.is_file() else None
    summary = summarise(cells, teacher)
    if args.step_times:
        side_by_side(summary, Path(args.step_times))
    out = Path(args.out)
    write_json(summary, out / "leaderboard.json")
    text = markdown(summary)
    write_text(text, out / "leaderboard.md")
    plot(summary, out / "leaderboard.png")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rows = sub.add_parser("rows", help="write each row's resolved distill settings")
    rows.add_argument("--params", default="params.yaml")
    rows.add_argument("--out", default="compare/rows")
    cell = sub.add_parser("cell", help="train + evaluate one row at one seed")
    cell.add_argument("row", help="a name in compare.methods")
    cell.add_argument("seed", type=int)
    cell.add_argument("--out", required=True)
    cell.add_argument("--params", default="params.yaml")
    cell.add_argument("--row-file", help="the row's settings as `rows` wrote them, checked")
    cell.add_argument("--data", default="data/prepared")
    cell.add_argument("--teacher", default="models/teacher.pt")
    board = sub.add_parser("leaderboard", help="summarise every finished cell")
    board.add_argument("--cells", default="compare/cells")
    board.add_argument("--params", help="read only the cells of its compare.methods x seeds "
                       "(default: every cell in --cells)")
    board.add_argument("--teacher-metrics", default="metrics/teacher.json")
    board.add_argument("--step-times", help="step-time ratios from one side-by-side run "
                       "(benchmarks/distill_cost.py --methods none ... --out FILE)")
    board.add_argument("--out", default="compare")
    args = parser.parse_args(argv)
    run = {"rows": run_rows, "cell": run_cell, "leaderboard": run_leaderboard}[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(cli.run(main))
