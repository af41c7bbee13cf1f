"""Removable forward hooks that expose what a torchvision detector computes inside.

``capture(detector)`` records the output of ``detector.transform`` (the resized,
padded batch and the rescaled targets) and of ``detector.backbone`` (the FPN
maps, finest first) during one forward pass, without subclassing or editing the
detector. The hooks are removed when the block exits, even when it raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList


@dataclass
class Tap:
    """What one forward pass exposed: ``images.tensors`` (B, 3, H, W) after normalise/resize/pad,
    ``targets`` with boxes in those coordinates, ``features`` = FPN maps (B, C, H_l, W_l)."""

    images: ImageList | None = None
    targets: list[dict[str, torch.Tensor]] | None = None
    features: list[torch.Tensor] = field(default_factory=list)


def part(detector: nn.Module, name: str) -> nn.Module:
    """``detector.transform`` / ``detector.backbone`` (all torchvision detectors have both)."""
    module = getattr(detector, name, None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"{type(detector).__name__} has no .{name}: not a torchvision detector")
    return module


@contextmanager
def capture(detector: nn.Module) -> Iterator[Tap]:
    tap = Tap()

    def on_transform(_: nn.Module, __: Any, output: tuple[ImageList, Any]) -> None:
        tap.images, tap.targets = output

    def on_backbone(_: nn.Module, __: Any, output: dict[str, torch.Tensor]) -> None:
        tap.features = list(output.values())  # by position: level names differ per detector

    transform, backbone = part(detector, "transform"), part(detector, "backbone")
    handles = [
        transform.register_forward_hook(on_transform),
        backbone.register_forward_hook(on_backbone),
    ]
    try:
        yield tap
    finally:
        for handle in handles:
            handle.remove()
