"""DVC stages `train_teacher`, `train_student` and `distill`: one detector -> checkpoint.

    python -m stages.train teacher|student --out ... --history ... --work-dir ...
    python -m stages.train student --teacher models/teacher.pt ...   # distillation

The baseline student uses the same recipe, budget and initial weights that
distillation uses, without the teacher. With ``--teacher`` the student is
wrapped in a Distiller (params `distill`) and only the student is saved.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

import torch

from drkd import cli
from drkd.checkpoint import (
    code_digest,
    load_detector,
    model_card,
    model_checkpoint,
    save_atomic,
)
from drkd.config import UserError, load_params, to_dict
from drkd.data.coco import CocoDetection
from drkd.data.transforms import train_transforms
from drkd.distiller import Distiller
from drkd.engine import distributed, fit, is_main
from drkd.files import atomic_path, require_files
from drkd.models import build_detector, count_parameters
from drkd.tracking import stage_run


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """Loss history as CSV (one row per logged step) for `dvc plots` and the report."""
    names = sorted({k for row in history for k in row} - {"step"})
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", *names])
        for row in history:
            writer.writerow([int(row["step"]), *(f"{row.get(n, float('nan')):.6g}" for n in names)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("which", choices=["teacher", "student"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", required=True, help="model checkpoint to write")
    parser.add_argument("--history", required=True, help="loss history CSV to write")
    parser.add_argument(
        "--work-dir", required=True, help="resumable per-epoch state (not a DVC out)"
    )
    parser.add_argument("--teacher", help="teacher checkpoint: distill the student from it")
    parser.add_argument("--modules-out", help="with --teacher: save the training-only DRKD modules")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    section = getattr(params, args.which)
    data = Path(args.data)
    require_files([data / "train.json"])
    dataset = CocoDetection(data / "train.json", train_transforms(section.train.hflip))
    torch.manual_seed(params.seed)
    model = build_detector(section.model, dataset.num_classes)
    logged: dict[str, object] = {"seed": params.seed, args.which: to_dict(section)}
    digest = hashlib.md5((data / "train.json").read_bytes())
    trained: torch.nn.Module = model
    stage = f"train_{args.which}"
    if args.teacher:
        teacher, state = load_detector(args.teacher)
        if state["category_ids"] != dataset.category_ids:
            raise UserError(f"{args.teacher}: trained on other categories than {data}")
        trained = Distiller(model, teacher, params.distill)
        logged["distill"] = to_dict(params.distill)
        digest.update(Path(args.teacher).read_bytes())
        stage = "distill"
    digest.update(json.dumps(logged, sort_keys=True).encode())
    # The code too: a run killed under other code is not continued under this one.
    digest.update(code_digest().encode())
    fingerprint = digest.hexdigest()
    with (
        distributed(),
        stage_run(
            params.tracking,
            stage,
            logged,
            [data / "train.json", data / "val.json"],
            enabled=is_main(),
            system_metrics=True,
        ) as run,
    ):
        run.log_dataset(data / "train.json", "training")
        if args.teacher:
            run.log_model_input(run.find_model(Path(args.teacher)))
        trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        run.log_metrics({"parameters": count_parameters(model), "trainable_parameters": trainable})
        rows: list[dict[str, float]] = []  # logged rows of the running epoch

        def on_step(step: int, row: dict[str, float]) -> None:
            run.log_metrics(row, step)
            rows.append(row)

        def on_epoch(epoch: int, _: object) -> None:
            """Per-epoch means of every loss term, as `epoch/<term>` at step = epoch."""
            if rows:
                names = [k for k in rows[0] if k not in ("lr", "epoch")]
                means = {f"epoch/{k}": sum(r[k] for r in rows) / len(rows) for k in names}
                run.log_metrics(means, epoch)
            rows.clear()

        history = fit(
            trained,
            dataset,
            section.train,
            seed=params.seed,
            work_dir=args.work_dir,
            fingerprint=fingerprint,
            desc=args.which,
            on_step=on_step,
            on_epoch=on_epoch,
        )
        if is_main():
            saved = model_checkpoint(
                model, section.model, dataset.category_ids, dataset.category_names
            )
            save_atomic(saved, args.out)
            if isinstance(trained, Distiller) and args.modules_out:
                save_atomic(trained.modules_checkpoint(), args.modules_out)
            write_history(history, Path(args.history))
            run.log_artifact(args.history)
            run.log_model(Path(args.out).stem, Path(args.out), model_card(saved))
            # Finished: nothing is left to resume, so the next run of this stage (DVC reruns
            # it only when something changed) trains from the start.
            (Path(args.work_dir) / "last.pt").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
