"""MGD (Yang et al., ECCV 2022, "Masked Generative Distillation").

A random fraction ``mask_ratio`` of the (adapted) student's positions is zeroed, and a small
generation block (3x3 conv, ReLU, 3x3 conv) must produce the teacher's whole map from the
rest: the student learns features from which the teacher's can be generated, not copies.
Loss: squared error summed over the map, per image. The mask is drawn from torch's global
generator, so a seeded run draws the same masks.
"""

from __future__ import annotations

import torch
from torch import nn

from drkd.config import DistillConfig
from drkd.methods.common import align


def generator(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


def mgd_loss(generated: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """One level: generated and teacher maps (B, C, H, W) -> sum of squares / B."""
    return ((generated.float() - teacher.float()) ** 2).sum() / teacher.shape[0]


def keep_mask(like: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, 1, H, W) of 0/1 in ``like``'s dtype: each position dropped with probability ratio."""
    b, _, h, w = like.shape
    draw = torch.rand(b, 1, h, w, device=like.device)
    return (draw >= ratio).to(like.dtype)


class MGD(nn.Module):
    def __init__(self, cfg: DistillConfig, levels: int, c_s: int, c_t: int) -> None:
        super().__init__()
        self.weight, self.ratio = cfg.mgd.weight, cfg.mgd.mask_ratio
        self.adapters = nn.ModuleList(align(c_s, c_t) for _ in range(levels))
        self.generators = nn.ModuleList(generator(c_t) for _ in range(levels))

    def forward(
        self,
        student_maps: list[torch.Tensor],
        teacher_maps: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        batch_shape: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        terms = []
        for adapt, generate, s, t in zip(
            self.adapters, self.generators, student_maps, teacher_maps, strict=True
        ):
            s = adapt(s)
            terms.append(mgd_loss(generate(s * keep_mask(s, self.ratio)), t))
        return {"loss_mgd": self.weight * torch.stack(terms).sum()}
