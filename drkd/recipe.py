"""The training recipe every entry point shares: train one detector (the teacher, the baseline
student, or the student wrapped for distillation) with its loss history, checkpoint and MLflow
run; and ``shorten``, the one rule for running that recipe at a smaller budget.

The DVC stages (stages/train.py, stages/distill.py) and the compare cells call
``train_detector``; a tuning trial runs the same recipe shortened by ``shorten``. This module
does not import the distillation code (the caller passes a ``Distillation``), so editing a
method never reruns the teacher or the baseline student: their DVC deps are its imports.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from drkd.checkpoint import code_digest, model_card, model_checkpoint, save_atomic
from drkd.config import Params, TrainConfig, to_dict
from drkd.data.coco import CocoDetection
from drkd.data.transforms import train_transforms
from drkd.engine import distributed, fit, is_main, schedule
from drkd.files import atomic_path, require_files
from drkd.models import build_detector, count_parameters
from drkd.tracking import stage_run


def shorten(train: TrainConfig, epochs: int, max_steps: int = 0,
            num_images: int = 0) -> TrainConfig:
    """The recipe ``train`` at a budget of ``epochs`` (and ``max_steps``, 0 = no cap): its
    warm-up (rounded) and its step schedule's milestones shrink by the run's share of the full
    recipe, and never grow. A warm-up as long as a short run would leave the student
    untrained, and milestones past its end would leave the LR undecayed (cosine compresses by
    itself). The share counts steps when ``max_steps`` caps the run and ``num_images`` gives
    the steps an epoch has; epochs otherwise."""
    share = epochs / max(train.epochs, 1)
    if max_steps and num_images:
        per_epoch, _ = schedule(train, num_images)
        share = min(share, max_steps / (max(train.epochs, 1) * per_epoch))
    share = min(1.0, share)
    return dataclasses.replace(train, epochs=epochs, max_steps=max_steps,
                               warmup_steps=round(train.warmup_steps * share),
                               milestones=tuple(m * share for m in train.milestones))


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
    """What distillation adds to the student's training (built by ``stages.distill``, the one
    stage whose code depends on the methods)."""

    teacher: Path  # checkpoint: part of the resume fingerprint and the MLflow lineage
    wrap: Callable[[nn.Module, CocoDetection], nn.Module]  # student -> the module fit trains
    save: Callable[[nn.Module], None]  # rank 0, after the student is saved: the module's extras


def train_detector(
    params: Params,
    which: str,
    data: Path,
    out: Path,
    history_path: Path,
    work_dir: Path,
    distillation: Distillation | None = None,
) -> None:
    """Train params' ``which`` detector (with ``distillation``: the student, wrapped) on
    ``data``/train.json and save it to ``out``, its loss history to ``history_path`` and its
    MLflow run; resumes a killed run of the same inputs from ``work_dir``."""
    section = getattr(params, which)
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
            data,
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
                not_losses = ("lr", "epoch", "seconds", "peak_memory_mb", "threads")
                names = [k for k in rows[0] if k not in not_losses]
                means = {f"epoch/{k}": sum(r[k] for r in rows) / len(rows) for k in names}
                run.log_metrics(means, epoch)
            rows.clear()

        history = fit(
            trained,
            dataset,
            section.train,
            seed=params.seed,
            work_dir=work_dir,
            fingerprint=fingerprint,
            desc=which,
            on_step=on_step,
            on_epoch=on_epoch,
        )
        if is_main():
            saved = model_checkpoint(
                model, section.model, dataset.category_ids, dataset.category_names
            )
            save_atomic(saved, out)
            if distillation:
                distillation.save(trained)
            write_history(history, history_path)
            run.log_artifact(history_path)
            example = dataset.root / dataset.images[0]["file_name"] if len(dataset) else None
            model_id = run.log_model(out.stem, out, model_card(saved), example)
            if distillation:  # the newest distilled student is models:/<name>@candidate
                run.register(model_id, params.tracking.registered_model, "candidate")
            # Finished: nothing is left to resume, so the next run of this stage (DVC reruns
            # it only when something changed) trains from the start.
            (work_dir / "last.pt").unlink(missing_ok=True)
