"""DVC stage `leaderboard` of compare/dvc.yaml: the finished compare cells -> one board.

    python -m stages.leaderboard [--cells compare/cells] [--params params.yaml] \
        [--teacher-metrics metrics/teacher.json] [--step-times FILE] [--out compare]

Writes OUT/leaderboard.{json,md,png} (drkd.leaderboard) and prints the markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drkd import cli
from drkd.files import require_files
from drkd.leaderboard import write_board


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="compare/cells")
    parser.add_argument("--params", help="read only the cells of its compare.methods x seeds "
                        "(default: every cell in --cells)")
    parser.add_argument("--teacher-metrics", help="the teacher's metrics.json, for the gap "
                        "closed (default: metrics/teacher.json where it exists)")
    parser.add_argument("--step-times", help="step-time ratios from one side-by-side run "
                        "(python -m benchmarks.distill_cost --rows none ROW ... --out FILE)")
    parser.add_argument("--out", default="compare")
    args = parser.parse_args(argv)
    if args.teacher_metrics:  # named: it must be there; the default may be missing
        require_files([Path(args.teacher_metrics)])
    print(write_board(Path(args.cells), Path(args.out),
                      Path(args.params) if args.params else None,
                      Path(args.teacher_metrics or "metrics/teacher.json"),
                      Path(args.step_times) if args.step_times else None))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
