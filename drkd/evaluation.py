"""COCO box evaluation with pycocotools, and batched inference that produces its input."""

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

from drkd.data.coco import CocoDetection, coco_detections, collate

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
    if not detections:  # COCO's loadRes cannot take an empty list
        areas = [a["area"] for a in gt.dataset["annotations"] if not a.get("iscrowd", 0)]
        present = {
            "APs": any(a < 32**2 for a in areas),
            "APl": any(a > 96**2 for a in areas),
            "APm": any(32**2 <= a <= 96**2 for a in areas),
        }
        empty = {name: 0.0 if present.get(name, True) else -1.0 for name in STAT_NAMES}
        return {**empty, "per_class_AP": {c["name"]: 0.0 for c in gt.cats.values()}}
    with contextlib.redirect_stdout(io.StringIO()):
        # loadRes adds area, id, iscrowd and a segmentation to each dict it gets: give it
        # copies, so the caller's detections (and the json written from them) stay as made.
        dt = gt.loadRes([dict(d) for d in detections])
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
