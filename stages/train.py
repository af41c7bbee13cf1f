"""DVC stages `train_teacher` and `train_student`: one detector -> checkpoint.

    python -m stages.train teacher|student --out ... --history ... --work-dir ...

The baseline student uses the same recipe, budget and initial weights that
distillation (stages/distill.py, through ``train``) uses, without the teacher. This module
does not import the distillation code, so editing a method does not retrain the teacher or
the baseline (their DVC deps are this module's imports).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from drkd import cli
from drkd.checkpoint import code_digest, model_card, model_checkpoint, save_atomic
from drkd.config import Params, load_params, to_dict
from drkd.data.coco import CocoDetection
from drkd.data.transforms import train_transforms
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


@dataclass(frozen=True)
class Distillation:
    """What the `distill` stage adds to the student's training (built by stages/distill.py)."""

    teacher: Path  # checkpoint: part of the resume fingerprint and the MLflow lineage
    wrap: Callable[[nn.Module, CocoDetection], nn.Module]  # student -> the module fit trains
    save: Callable[[nn.Module], None]  # rank 0, after the student is saved: the module's extras


def arguments(description: str | None) -> argparse.ArgumentParser:
    """The options of every training stage."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", required=True, help="model checkpoint to write")
    parser.add_argument("--history", required=True, help="loss history CSV to write")
    parser.add_argument(
        "--work-dir", required=True, help="resumable per-epoch state (not a DVC out)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("which", choices=["teacher", "student"])
    args = parser.parse_args(argv)
    return train(args, load_params(args.params), args.which)


def train(args: argparse.Namespace, params: Params, which: str,
          distillation: Distillation | None = None) -> int:
    """Train params' ``which`` detector (with ``distillation``: the student, wrapped) and save
    it, its loss history and its MLflow run; resumes a killed run of the same inputs."""
    section = getattr(params, which)
    data = Path(args.data)
    require_files([data / "train.json"])
    dataset = CocoDetection(data / "train.json", train_transforms(section.train.hflip))
    torch.manual_seed(params.seed)
    model = build_detector(section.model, dataset.num_classes)
    logged: dict[str, object] = {"seed": params.seed, which: to_dict(section)}
    digest = hashlib.md5((data / "train.json").read_bytes())
    trained: nn.Module = model
    stage = f"train_{which}"
    if distillation:
        trained = distillation.wrap(model, dataset)
        logged["distill"] = to_dict(params.distill)
        digest.update(distillation.teacher.read_bytes())
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
        if distillation:
            run.log_model_input(run.find_model(distillation.teacher))
        trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        run.log_metrics({"parameters": count_parameters(model), "trainable_parameters": trainable})
        rows: list[dict[str, float]] = []  # logged rows of the running epoch

        def on_step(step: int, row: dict[str, float]) -> None:
            run.log_metrics(row, step)
            rows.append(row)

        def on_epoch(epoch: int, _: object) -> None:
            """Per-epoch means of every loss term, as `epoch/<term>` at step = epoch."""
            if rows:
                not_losses = ("lr", "epoch", "seconds", "peak_memory_mb")
                names = [k for k in rows[0] if k not in not_losses]
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
            desc=which,
            on_step=on_step,
            on_epoch=on_epoch,
        )
        if is_main():
            saved = model_checkpoint(
                model, section.model, dataset.category_ids, dataset.category_names
            )
            save_atomic(saved, args.out)
            if distillation:
                distillation.save(trained)
            write_history(history, Path(args.history))
            run.log_artifact(args.history)
            run.log_model(Path(args.out).stem, Path(args.out), model_card(saved))
            # Finished: nothing is left to resume, so the next run of this stage (DVC reruns
            # it only when something changed) trains from the start.
            (Path(args.work_dir) / "last.pt").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
