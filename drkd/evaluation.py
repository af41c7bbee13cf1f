"""COCO box evaluation with pycocotools, the batched inference that produces its input, and
the `evaluate` stage's work (``evaluate_checkpoint``)."""

from __future__ import annotations

import contextlib
import io
import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils import benchmark
from torch.utils.data import DataLoader
from tqdm import tqdm

from drkd.checkpoint import check_categories, load_detector, model_card
from drkd.config import Params
from drkd.data.coco import CocoDetection, coco_detections, collate
from drkd.data.transforms import eval_transforms
from drkd.devices import pick_device
from drkd.files import require_files, write_json
from drkd.models import count_parameters
from drkd.tracking import mlflow_name, stage_run

# COCOeval.stats indices of the numbers we report.
STAT_NAMES = {"AP": 0, "AP50": 1, "AP75": 2, "APs": 3, "APm": 4, "APl": 5, "AR100": 8}


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: CocoDetection,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], float]:
    """Detections in COCO result format (original category ids) and mean inference ms/image."""
    model.eval().to(device)
    # Its own generator: a DataLoader otherwise draws its base seed from the global RNG, and
    # evaluating between epochs (on_epoch, tuning) must not move training's random stream.
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        generator=torch.Generator(),
    )
    results: list[dict[str, Any]] = []
    seconds = 0.0
    for images, targets in tqdm(
        loader, desc="predict", unit="batch", disable=not progress, leave=False
    ):
        start = time.perf_counter()
        outputs = model([im.to(device) for im in images])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        for target, out in zip(targets, outputs, strict=True):
            results += [{"image_id": int(target["image_id"]), **d}
                        for d in coco_detections(out, dataset.category_ids)]
    return results, 1000 * seconds / max(len(dataset), 1)


def coco_metrics(annotation_file: str | Path, detections: list[dict[str, Any]]) -> dict[str, Any]:
    """{AP, AP50, AP75, APs, APm, APl, AR100} as fractions 0..1 (-1 where COCO has no such
    ground truth), plus ``per_class_AP`` by category name."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
    with contextlib.redirect_stdout(io.StringIO()):
        if detections:
            # loadRes adds area, id, iscrowd and a segmentation to each dict it gets: give it
            # copies, so the caller's detections (and the json written from them) stay as made.
            dt = gt.loadRes([dict(d) for d in detections])
        else:  # loadRes cannot take an empty list; COCOeval scores an empty result as usual
            dt = COCO()
            dt.dataset = {**gt.dataset, "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    metrics: dict[str, Any] = {name: float(ev.stats[i]) for name, i in STAT_NAMES.items()}
    # precision: [iou thresholds, recall points, categories, area ranges, max dets]
    precision = ev.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, cat_id in enumerate(ev.params.catIds):
        valid = precision[:, :, k][precision[:, :, k] > -1]
        per_class[gt.cats[cat_id]["name"]] = float(np.mean(valid)) if valid.size else -1.0
    metrics["per_class_AP"] = per_class
    return metrics


@torch.no_grad()
def ms_per_image(model: nn.Module, dataset: CocoDetection, num_images: int,
                 device: torch.device) -> float:
    """Latency: mean ms of one forward pass at batch size 1 over the first ``num_images``
    images, each once, after torch.utils.benchmark's Timer's own two untimed passes (cudnn
    autotuning, lazy allocations); the Timer synchronises CUDA and keeps this process's
    thread count."""
    model.eval().to(device)
    images = [dataset[i][0].to(device) for i in range(min(num_images, len(dataset)))]
    if not images:
        return 0.0
    timer = benchmark.Timer("model([next(images)])", num_threads=torch.get_num_threads(),
                            globals={"model": model, "images": itertools.cycle(images)})
    return 1000 * timer.timeit(len(images)).mean


def evaluate_checkpoint(params: Params, name: str, checkpoint: Path, data: Path,
                        metrics_file: Path, detections_file: Path,
                        headline_file: Path | None = None) -> str:
    """One checkpoint on ``data``/val.json -> its metrics json (every key), raw COCO detections
    and optionally the headline json (``STAT_NAMES`` alone, the DVC metrics file), all logged
    to one MLflow run. Returns the one-line summary the stage prints.

    ``inference_ms_per_image`` is latency: ``ms_per_image`` over ``evaluate.timing_images``
    images at batch 1; with ``timing_images: 0`` the batched mean of the metrics pass."""
    require_files([data / "val.json"])
    dataset = CocoDetection(data / "val.json", eval_transforms())
    model, saved = load_detector(checkpoint)
    check_categories(str(checkpoint), saved, dataset)
    device = pick_device()
    logged = {
        "name": name,
        "checkpoint": str(checkpoint),
        "model": saved["model_config"],
        # the keys this stage reads, as in its params deps in dvc.yaml
        "evaluate": {"batch_size": params.evaluate.batch_size,
                     "timing_images": params.evaluate.timing_images},
    }
    with stage_run(params.tracking, f"evaluate@{name}", logged, data) as run:
        val = run.log_dataset(data / "val.json", "evaluation")
        # The model its training run logged; else (trained untracked, or in another store)
        # this run logs it, so the metrics below still lead to the weights.
        example = dataset.root / dataset.images[0]["file_name"] if len(dataset) else None
        model_id = run.find_model(checkpoint) or run.log_model(
            name, checkpoint, model_card(saved), example)
        detections, ms = predict(model, dataset, params.evaluate.batch_size, device)
        metrics = coco_metrics(data / "val.json", detections)
        if params.evaluate.timing_images:
            ms = ms_per_image(model, dataset, params.evaluate.timing_images, device)
        metrics["parameters"] = count_parameters(model)
        metrics["inference_ms_per_image"] = round(ms, 3)
        write_json(detections, detections_file)
        write_json(metrics, metrics_file)
        if headline_file:
            write_json({key: metrics[key] for key in STAT_NAMES}, headline_file)
        numbers = {key: metrics[key] for key in (*STAT_NAMES, "parameters",
                                                 "inference_ms_per_image")}
        per_class = {f"AP_class.{mlflow_name(c)}": ap for c, ap in metrics["per_class_AP"].items()}
        run.log_metrics({**numbers, **per_class}, model_id=model_id, dataset=val)
        run.log_artifact(metrics_file)
    return (f"{name}: AP {100 * metrics['AP']:.1f}  AP50 {100 * metrics['AP50']:.1f}  "
            f"{metrics['parameters'] / 1e6:.2f} M params  {ms:.1f} ms/image ({device.type})")
