"""`make compare`: the student of params.yaml distilled from the same teacher by every row of
``compare.methods``, for every seed in ``compare.seeds`` (``compare/dvc.yaml``, one DVC
``matrix`` stage: each cell is cached, so adding a row or a seed runs only its cells, editing a
row reruns only that row's, and a rerun with nothing changed is a no-op), then a leaderboard.
A row is a method as params.yaml sets it or a variant of one (an ablation): a name and its
overrides of the `distill` section (``drkd.config.row_distill``).

    python -m stages.compare rows --out compare/rows
    python -m stages.compare cell ROW SEED --out compare/cells/ROW-sSEED [--row-file R]
    python -m stages.leaderboard --cells compare/cells --out compare   (its own stage)

``rows`` writes each row's resolved `distill` settings, only the keys its method reads
(its ``keys`` in drkd.registry), to ``ROW.json``: a cell depends on its row's file, not on the
whole `distill` section, so tuning one method reruns only that method's cells and `none` no
cell's. A cell trains with the student recipe (``compare.epochs`` > 0 shortens it for every
cell alike), exactly those settings and the given seed, as ``<launcher> -m stages.distill``
like the main pipeline (torchrun: DDP); `none` is the baseline student.
It writes ``params.yaml`` (the exact values it used), ``history.csv``, ``model.pt`` (DRKD's
modules, as its method or in ``plus``: ``modules.pt`` too), ``metrics.json`` (COCO metrics of
val) and ``cost.json`` (seconds per training step over the whole run, resumed parts
included, setup and evaluation not; the training's peak memory, rank 0's under DDP), and is
one MLflow run tagged ``row``, ``method``, ``seed`` and ``compare_id`` (a hash of what every
cell of one comparison shares: data, teacher, student recipe, budget, launcher).

The leaderboard is drkd.leaderboard behind its own stage, stages.leaderboard: no cell imports
it, so restyling the board reruns only the board.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drkd import cli
from drkd.compare import run_cell, write_rows


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
    args = parser.parse_args(argv)
    if args.command == "rows":
        write_rows(args.params, Path(args.out))
    else:
        run_cell(args.params, args.row, args.seed, Path(args.out), Path(args.data),
                 Path(args.teacher), Path(args.row_file) if args.row_file else None)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
