"""Optuna study over a distillation method's params (`make tune`; not a stage of `dvc repro`).

    python -m stages.tune [--method M] [--n-trials N] [--workers W] [--storage URL]
    python -m stages.tune --calibrate STEPS [--method M]
    python -m stages.tune --promote [--apply] [--row NAME] [--method M]

Objective: validation AP of a student distilled for the short budget `tune.epochs` /
`tune.max_steps` with the suggested values applied onto `distill`; the per-epoch AP feeds the
pruner. Several workers may share the study's RDB; `tune.n_trials` counts the trials that ran
their course over all of them (a trial whose worker died or was stopped runs again). Writes
OUT/best_params.yaml, OUT/trials.csv and plots (OUT/<method>/ for a method other than drkd);
`--promote` turns the best values into a `dvc exp run -S` line, a params.yaml edit (`--apply`)
or a compare row (`--row`). The study: drkd/tuning.py (docs/compare-and-tune.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drkd import cli, tuning
from drkd.config import method_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--params", default="params.yaml")
    add("--data", default="data/prepared")
    add("--teacher", default="models/teacher.pt")
    add("--storage", default="", help=f"Optuna RDB URL (default: tune.storage, else "
        f"{tuning.DEFAULT_STORAGE})")
    add("--n-trials", type=int, default=0,
        help="trials run to their end in total over all workers (default: tune.n_trials)")
    add("--method", default="", choices=method_names("", tunable=True),
        help="the method to tune (default: tune.method, else distill.method)")
    add("--out", default="tuning",
        help="best_params.yaml, trials.csv, plots (OUT/<method>/ for a method other than drkd)")
    add("--promote", action="store_true",
        help="print the `dvc exp run -S ...` line for OUT/best_params.yaml")
    add("--row", default="",
        help="with --promote: add the tuned values as this compare.methods row, not into distill")
    add("--apply", action="store_true", help="with --promote: edit --params")
    add("--workers", type=int, default=1,
        help="run this many workers of the study on this machine, each with its share of the "
        "cores (OMP_NUM_THREADS when set)")
    add("--calibrate", type=int, default=0, metavar="STEPS",
        help="measure each loss term against the detection loss over STEPS training steps and "
        "check the method's search space (docs/compare-and-tune.md); no study")
    args = parser.parse_args(argv)
    if args.n_trials < 0:
        parser.error("--n-trials must not be negative (0: tune.n_trials)")
    if (args.apply or args.row) and not args.promote:
        parser.error("--apply and --row go with --promote")
    if args.workers < 1:
        parser.error("--workers must be positive")
    if args.workers > 1 and not (args.promote or args.calibrate):
        tuning.run_workers(["--params", args.params, "--data", args.data, "--teacher",
                            args.teacher, "--storage", args.storage, "--n-trials",
                            str(args.n_trials), "--method", args.method, "--out", args.out],
                           args.workers)
    elif args.calibrate:
        tuning.print_calibration(args.params, args.method, Path(args.data),
                                 Path(args.teacher), args.calibrate)
    elif args.promote:
        tuning.promote_best(args.params, args.method, Path(args.out), args.row, args.apply)
    else:
        tuning.tune(args.params, args.method, Path(args.data), Path(args.teacher),
                    args.storage, args.n_trials, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
