"""PKD (Cao et al., NeurIPS 2022, "PKD: General Distillation Framework for Object Detectors
via Pearson Correlation Coefficient").

Each FPN map is standardised per channel (over batch and positions), then compared by MSE,
halved: (M-1)/M * (1 - r) over M = B*H*W values, with r the Pearson correlation of the two
maps' channels (1 - r for all but the tiniest maps). Standardising makes
the loss blind to the teacher's feature magnitude, which differs between detectors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from drkd.config import DistillConfig
from drkd.methods.common import align


def standardise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W) -> per channel zero mean, unit (unbiased) std over B, H, W:
    (x - mean) / sqrt(var + eps^2). A single value per channel (batch 1 on a 1x1 map)
    standardises to 0, not to NaN."""
    x = x.float()
    n = x.numel() // x.shape[1]  # values per channel
    if n == 1:
        return x * 0.0
    # One fused batch_norm, forward and backward, instead of a reduction and four elementwise
    # passes over the map: batch_norm divides by the biased std, so scale by sqrt((n-1)/n).
    scale = x.new_full((x.shape[1],), math.sqrt((n - 1) / n))
    return F.batch_norm(x, None, None, scale, training=True, eps=eps**2 * (n - 1) / n)


def pkd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """One level: (B, C, H, W) maps of equal shape -> scalar."""
    return F.mse_loss(standardise(student), standardise(teacher)) / 2


class PKD(nn.Module):
    def __init__(self, cfg: DistillConfig, levels: int, c_s: int, c_t: int) -> None:
        super().__init__()
        self.weight = cfg.pkd.weight
        # Standardised maps need no adapter of equal width (the loss is scale-free); a
        # narrower student needs a 1x1 conv to have channels to correlate with.
        self.adapters = nn.ModuleList(align(c_s, c_t) for _ in range(levels))

    def forward(
        self,
        student_maps: list[torch.Tensor],
        teacher_maps: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        batch_shape: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        terms = [
            pkd_loss(a(s), t)
            for a, s, t in zip(self.adapters, student_maps, teacher_maps, strict=True)
        ]
        return {"loss_pkd": self.weight * torch.stack(terms).sum()}
