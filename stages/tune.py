"""Optuna study over a distillation method's params (`make tune`; deliberately not a stage of
`dvc repro`). DRKD by default; `--method pkd` (or `tune.method`) tunes another method over its
`tune.spaces.<method>`, in its own study `<study_name>-<method>`, writing OUT/<method>/.

    python -m stages.tune [--params params.yaml] [--data data/prepared]
                          [--teacher models/teacher.pt] [--storage URL] [--n-trials N]
                          [--out tuning]
    python -m stages.tune --promote [--apply] [--method M] [--row NAME] [--out tuning]
                          [--params params.yaml]

Objective: validation AP of the student distilled from the teacher checkpoint for the short
budget `tune.epochs` / `tune.max_steps`, with the suggested values applied onto `distill`
(and `student.train.lr`). Every trial starts from the same seeded init in its own temporary
work dir; the per-epoch AP feeds the pruner. The study lives in an RDB (default
sqlite:///optuna.db in the current folder): rerunning continues it, and several workers may
run it at once; `tune.n_trials` counts finished trials (complete, pruned, failed) over all
workers. A trial left RUNNING by a killed worker is failed once its heartbeat is `tune.grace_s` old.

Writes OUT/best_params.yaml (a partial params file), OUT/trials.csv and OUT/*.png. `--promote`
prints the `dvc exp run -S ...` line for best_params.yaml; `--promote --apply` merges it into
params.yaml (comments kept where possible); with `--row NAME` the tuned values become the
compare row NAME (`{method: M, ...}`) instead, so `make compare` runs the published and the
tuned method side by side. The study lives in drkd/tuning.py, the one module that imports
Optuna.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drkd import cli
from drkd.config import method_names
from drkd.params_file import promote
from drkd.tuning import DEFAULT_STORAGE, print_calibration, run_workers, tune


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--params", default="params.yaml")
    add("--data", default="data/prepared")
    add("--teacher", default="models/teacher.pt")
    add("--storage", default="", help=f"Optuna RDB URL (default: tune.storage, else "
        f"{DEFAULT_STORAGE})")
    add("--n-trials", type=int, default=0,
        help="finished trials in total over all workers (default: tune.n_trials)")
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
        parser.error("--n-trials must be positive")
    if (args.apply or args.row) and not args.promote:
        parser.error("--apply and --row go with --promote")
    if args.workers < 1:
        parser.error("--workers must be positive")
    if args.workers > 1 and not (args.promote or args.calibrate):
        run_workers(["--params", args.params, "--data", args.data, "--teacher", args.teacher,
                     "--storage", args.storage, "--n-trials", str(args.n_trials),
                     "--method", args.method, "--out", args.out], args.workers)
    elif args.calibrate:
        print_calibration(args.params, args.method, Path(args.data), Path(args.teacher),
                          args.calibrate)
    elif args.promote:
        promote(args.params, args.method, Path(args.out), args.row, args.apply)
    else:
        tune(args.params, args.method, Path(args.data), Path(args.teacher), args.storage,
             args.n_trials, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
