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
workers. A trial left RUNNING by a killed worker is failed once its heartbeat is GRACE_S old.

Writes OUT/best_params.yaml (a partial params file), OUT/trials.csv and OUT/*.png. `--promote`
prints the `dvc exp run -S ...` line for best_params.yaml; `--promote --apply` merges it into
params.yaml (comments kept where possible); with `--row NAME` the tuned values become the
compare row NAME (`{method: M, ...}`) instead, so `make compare` runs the published and the
tuned method side by side. Optuna is imported only here and in drkd/tuning.py
(design rule 10), where the study lives.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import optuna

from drkd import cli
from drkd.config import ConfigError, UserError, flatten, load_params, method_names, read_yaml_file
from drkd.data.coco import CocoDetection
from drkd.data.transforms import eval_transforms, train_transforms
from drkd.distiller import load_teacher
from drkd.files import require_files
from drkd.params_file import apply, check, flags
from drkd.tracking import parent_run
from drkd.tuning import (
    DEFAULT_STORAGE,
    Gate,
    calibrate,
    current_values,
    make_objective,
    open_study,
    run_study,
    trial_params,
    write_outputs,
)


def tune(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    method = args.method or params.tune.method or params.distill.method
    if method == "none":
        raise UserError("tune: distill.method is none; pick a method (--method or tune.method)")
    out = Path(args.out) if method == "drkd" else Path(args.out) / method
    data, teacher_path = Path(args.data), Path(args.teacher)
    if not teacher_path.is_file():
        raise UserError(f"{teacher_path}: teacher checkpoint not found (dvc repro train_teacher)")
    if not (data / "train.json").is_file():
        raise UserError(f"{data / 'train.json'}: not found (dvc repro prepare)")
    train = CocoDetection(data / "train.json", train_transforms(params.student.train.hflip))
    val = CocoDetection(data / "val.json", eval_transforms())
    teacher = load_teacher(teacher_path, train)
    trial_params(params, {}, method)  # the budget override must itself be valid params
    url = args.storage or params.tune.storage or DEFAULT_STORAGE
    n_trials = args.n_trials or params.tune.n_trials
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    gate = Gate(url)
    gate.acquire()  # two workers creating a fresh sqlite file would race on its tables
    try:
        study = open_study(params, url, method)
        if not study.trials:
            study.enqueue_trial(current_values(params, method), user_attrs={"from": "params.yaml"})
    finally:
        gate.release()
    print(
        f"[tune] study '{study.study_name}' in {url}: {len(study.trials)} trials so far, "
        f"budget {n_trials}"
    )
    with parent_run(params, study.study_name, url, n_trials, data) as track:
        objective = make_objective(params, teacher, train, val, track, method)
        run_study(study, objective, n_trials, params.tune.sampler_seed, gate)
        write_outputs(study, out, track, method)
    return 0


def calibrate_space(args: argparse.Namespace) -> int:
    """Print each loss term of the method against the detection loss over the first
    ``--calibrate`` steps, and whether its search range contains the weights that put it
    between 0.1x and 10x the detection loss."""
    params = load_params(args.params)
    method = args.method or params.tune.method or params.distill.method
    if method == "none":
        raise UserError("tune: distill.method is none; pick a method (--method or tune.method)")
    data = Path(args.data)
    require_files([data / "train.json", Path(args.teacher)])
    train = CocoDetection(data / "train.json", train_transforms(params.student.train.hflip))
    teacher = load_teacher(args.teacher, train)
    with tempfile.TemporaryDirectory() as work:
        rows = calibrate(params, method, teacher, train, args.calibrate, Path(work))
    print(f"{method}: each term / the detection loss, mean over steps 1-{args.calibrate}\n")
    print("| term | weight | value | term / detection | weight for 0.1x..10x | space | covers |")
    print("|---|---|---:|---:|---|---|---|")
    for r in rows:
        low, high = r["suggested"] or (float("nan"), float("nan"))
        space = "..".join(f"{v:.3g}" for v in r["space"]) if r["space"] else "off"
        print(f"| {r['term']} | {r['dimension']} | {r['weight']:.3g} | {r['ratio']:.3g} | "
              f"{low:.3g}..{high:.3g} | {space} | {'yes' if r['covers'] else 'NO'} |")
    return 0


def promote(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    method = args.method or params.tune.method or params.distill.method
    path = Path(args.out) / ("" if method in ("drkd", "none") else method) / "best_params.yaml"
    if not path.is_file():
        raise UserError(f"{path}: not found (run python -m stages.tune first)")
    best = read_yaml_file(path) or {}
    if not isinstance(best, dict) or not set(best) <= {"distill", "student"}:
        raise ConfigError(f"{path}: expected a partial params file with distill / student")
    flat = flatten(best)
    if args.row:  # a comparison row beside the method's own: published and tuned on one board
        if set(best) != {"distill"}:
            raise UserError(f"{path}: tunes {', '.join(k for k in flat if k[:8] != 'distill.')}"
                            "; a compare row sets `distill` only (promote without --row)")
        if args.row in params.compare.methods:
            raise UserError(f"{args.params}: compare.methods has a row {args.row!r} already; "
                            "pick a new name (or delete that row first)")
        best = {"compare": {"methods": {args.row: {"method": method, **best["distill"]}}}}
        flat = flatten(best)
    params_path = Path(args.params)
    if not args.apply:
        check(params_path, best, str(path))
        target = "compare/dvc.yaml " if args.row else ""  # the row runs in `make compare`
        print(f"dvc exp run {target}{flags(best, add=bool(args.row))}")
        return 0
    apply(params_path, best, str(path))
    print(f"[tune] {params_path}: set {', '.join(f'{k}={v!r}' for k, v in flat.items())}")
    if args.row:
        print(f"[tune] `make compare` now runs row {args.row!r}'s cells")
        return 0
    print("[tune] `dvc repro` now reruns distill and what follows")
    if "student.train.lr" in flat:
        print(
            "[tune] student.train.lr changed: the baseline student (train_student) "
            "retrains too, so the comparison stays like for like"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--teacher", default="models/teacher.pt")
    parser.add_argument(
        "--storage",
        default="",
        help=f"Optuna RDB URL (default: tune.storage, else {DEFAULT_STORAGE})",
    )
    parser.add_argument(
        "--n-trials",
        type=int,
        default=0,
        help="finished trials in total over all workers (default: tune.n_trials)",
    )
    parser.add_argument(
        "--method",
        default="",
        choices=method_names(""),
        help="the method to tune (default: tune.method, else distill.method)",
    )
    parser.add_argument(
        "--out",
        default="tuning",
        help="best_params.yaml, trials.csv, plots (OUT/<method>/ for a method other than drkd)",
    )
    parser.add_argument(
        "--promote",
        action="store_true",
        help="print the `dvc exp run -S ...` line for OUT/best_params.yaml",
    )
    parser.add_argument(
        "--row",
        default="",
        help="with --promote: add the tuned values as this compare.methods row, not into distill",
    )
    parser.add_argument("--apply", action="store_true", help="with --promote: edit --params")
    parser.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="STEPS",
        help="measure each loss term against the detection loss over STEPS training steps and "
        "check the method's search space (docs/compare-and-tune.md); no study",
    )
    args = parser.parse_args(argv)
    if args.n_trials < 0:
        parser.error("--n-trials must be positive")
    if (args.apply or args.row) and not args.promote:
        parser.error("--apply and --row go with --promote")
    if args.calibrate:
        return calibrate_space(args)
    return promote(args) if args.promote else tune(args)


if __name__ == "__main__":
    sys.exit(cli.run(main))
