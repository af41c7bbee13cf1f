"""`mimic`: plain feature imitation (FitNets on the FPN), the baseline every method must beat.

A 1x1 adapter per level brings the student map to the teacher's width; the loss is
``distance`` (``distill.reduction``) to the teacher map, summed over levels.
"""

from __future__ import annotations

import torch
from torch import nn

from drkd.config import DistillConfig
from drkd.losses import level_sum


class Mimic(nn.Module):
    def __init__(self, cfg: DistillConfig, levels: int, c_s: int, c_t: int) -> None:
        super().__init__()
        self.weight, self.reduction = cfg.w_mimic, cfg.reduction
        self.adapters = nn.ModuleList(
            nn.Conv2d(c_s, c_t, 1) for _ in range(levels if cfg.w_mimic > 0 else 0)
        )

    def forward(
        self,
        student_maps: list[torch.Tensor],
        teacher_maps: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        batch_shape: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        if not len(self.adapters):
            return {}
        adapted = [a(s) for a, s in zip(self.adapters, student_maps, strict=True)]
        return {"loss_mimic": self.weight * level_sum(adapted, teacher_maps, self.reduction)}
