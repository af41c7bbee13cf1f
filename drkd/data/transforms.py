"""Box-aware torchvision.transforms.v2 presets.

Detectors resize and normalise inside their own ``.transform``; here we only
augment and convert to float in [0, 1].
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def train_transforms(hflip: float) -> v2.Transform:
    steps: list[v2.Transform] = []
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes()]
    return v2.Compose(steps)


def eval_transforms() -> v2.Transform:
    return v2.ToDtype(torch.float32, scale=True)
