"""Distillation methods: one module each; ``build`` is the one place that picks.

A method is an ``nn.Module`` holding its training-only parts (adapters, generators,
relation blocks) whose ``forward(student_maps, teacher_maps, targets, batch_shape)`` returns
its weighted loss terms by name:

- ``student_maps``, ``teacher_maps``: the FPN maps, finest first, (B, C_s|C_t, H_l, W_l);
  the teacher's are detached.
- ``targets``: per image, the ground truth as the detector's transform left it: ``boxes``
  (K_i, 4) in padded-batch pixels (x1, y1, x2, y2) and ``labels`` (K_i,).
- ``batch_shape``: (H, W) of the padded batch the maps were computed from.

The Distiller owns everything else (hooks, the teacher, export). Each method is registered
once in drkd.registry (its module, `distill` section, search space, loss terms and the keys it
reads); ``build`` picks from there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from drkd import registry
from drkd.config import DistillConfig


class Combined(nn.Module):
    """Several methods' terms at once (``distill.plus``): each part sees the same maps and
    targets and returns its own named terms."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, *inputs: Any) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for part in self.parts:
            terms = part(*inputs)
            if set(terms) & set(out):  # two parts with one name would hide a term
                raise ValueError(f"distill.plus: loss terms named twice: {set(terms) & set(out)}")
            out.update(terms)
        return out


def build(cfg: DistillConfig, levels: int, c_s: int, c_t: int) -> nn.Module | None:
    """The training-only modules of ``cfg.method`` (and of ``cfg.plus``) for a pyramid of
    ``levels`` maps with C_s student and C_t teacher channels; None for ``none``."""
    if cfg.method == "none":
        return None
    parts = [registry.build_module(name)(cfg, levels, c_s, c_t)
             for name in (cfg.method, *cfg.plus)]
    return parts[0] if len(parts) == 1 else Combined(parts)
