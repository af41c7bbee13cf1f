"""CWD (Shu et al., ICCV 2021, "Channel-wise Knowledge Distillation for Dense Prediction").

Each channel of a map becomes a distribution over its positions (softmax with temperature
tau); the student matches the teacher's by KL(teacher || student), scaled by tau^2 and
averaged over channels and images. The loss attends to where each channel is most active.
"""

from __future__ import annotations

import torch
from torch import nn

from drkd.config import DistillConfig
from drkd.methods.common import align


def cwd_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """One level: (B, C, H, W) maps of equal shape -> scalar."""
    b, c = teacher.shape[:2]
    log_s = torch.log_softmax(student.float().flatten(2) / tau, dim=-1)
    log_t = torch.log_softmax(teacher.float().flatten(2) / tau, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum() * tau**2 / (b * c)


class CWD(nn.Module):
    def __init__(self, cfg: DistillConfig, levels: int, c_s: int, c_t: int) -> None:
        super().__init__()
        self.weight, self.tau = cfg.cwd.weight, cfg.cwd.tau
        self.adapters = nn.ModuleList(align(c_s, c_t) for _ in range(levels))

    def forward(
        self,
        student_maps: list[torch.Tensor],
        teacher_maps: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        batch_shape: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        terms = [
            cwd_loss(a(s), t, self.tau)
            for a, s, t in zip(self.adapters, student_maps, teacher_maps, strict=True)
        ]
        return {"loss_cwd": self.weight * torch.stack(terms).sum()}
