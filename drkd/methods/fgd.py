"""FGD (Yang et al., CVPR 2022, "Focal and Global Knowledge Distillation for Detectors").

Per FPN level, with the student map adapted to the teacher's width:

- focal: the teacher's spatial attention S (B, H, W) = HW softmax(mean_c |F| / T) and channel
  attention C (B, C) = C softmax(mean_hw |F| / T) weight the squared error, split by ground
  truth into foreground (each box's cells weighted 1 / its area in cells, overlaps take the
  larger) and background (1 / the number of background cells): alpha L_fg + beta L_bg;
- attention: gamma (|C_s - C_t|_1 + |S_s - S_t|_1), the student imitating where the teacher
  attends;
- global: lambda |GC_s(F_s) - GC_t(F_t)|^2, a GcBlock per side (context pooling + channel
  transform added back), whose output branch starts at zero.

Every sum is divided by the batch size. Two differences from the release, which scales boxes
by the unpadded image size and counts a box's last row and column inclusive (a box 4 cells
wide covers 5, each weighing 1/5): here boxes go to the map by the level's stride, and a box
covers the cells it overlaps, each weighing 1 / (H_r W_r) as in
the paper. (Rows are y, as in the release since its 2022 fix of a transposed mask.)
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from drkd.config import DistillConfig
from drkd.methods.common import align


def attention(x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> spatial (B, H, W) summing to HW and channel (B, C) summing to C."""
    b, c, h, w = x.shape
    value = x.float().abs()
    spatial = h * w * torch.softmax(value.mean(1).flatten(1) / temperature, dim=1)
    channel = c * torch.softmax(value.mean((2, 3)) / temperature, dim=1)
    return spatial.view(b, h, w), channel


def box_masks(
    boxes: list[torch.Tensor], map_shape: tuple[int, int], batch_shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background weights (B, h, w) of one level's map.

    A box covers the cells it overlaps, rows floor(y1)..ceil(y2)-1 and columns likewise (at
    least one each), and gives each 1 / their number, the paper's 1 / (H_r W_r): every box
    weighs 1 in all. Background cells weigh 1 / their number (no background: all zero)."""
    h, w = map_shape
    device = boxes[0].device if boxes else torch.device("cpu")
    fg = torch.zeros(len(boxes), h * w, device=device)
    counts = [len(b) for b in boxes]
    if sum(counts):
        # By the level's stride s: a map of a batch side W that s does not divide has
        # ceil(W / s) cells (192 px at stride 128: 2 rows), so the map's share of the batch
        # would stretch the boxes; W / w lies in (s / 2, s] for any W >= s.
        stride = 2.0 ** math.ceil(math.log2(batch_shape[1] / w))
        cells = torch.cat(boxes).float() / stride
        # Last cell exclusive (the release's ceil(x2) inclusive adds a row and a column).
        x0, y0 = cells[:, 0].floor().clamp(0, w - 1), cells[:, 1].floor().clamp(0, h - 1)
        x1 = torch.maximum(cells[:, 2].ceil().clamp(max=w), x0 + 1)
        y1 = torch.maximum(cells[:, 3].ceil().clamp(max=h), y0 + 1)
        area = (y1 - y0) * (x1 - x0)
        ys = torch.arange(h, device=device, dtype=cells.dtype)
        xs = torch.arange(w, device=device, dtype=cells.dtype)
        rows = (ys >= y0[:, None]) & (ys < y1[:, None])  # (K, h)
        cols = (xs >= x0[:, None]) & (xs < x1[:, None])  # (K, w)
        per_box = (rows[:, :, None] & cols[:, None, :]).flatten(1) / area[:, None]  # (K, h*w)
        image = torch.repeat_interleave(torch.arange(len(boxes), device=device),
                                        torch.tensor(counts, device=device))
        fg.scatter_reduce_(0, image[:, None].expand_as(per_box), per_box, "amax")
    bg = (fg == 0).float()
    bg = bg / bg.sum(1, keepdim=True).clamp(min=1)
    return fg.view(-1, h, w), bg.view(-1, h, w)


class GlobalContext(nn.Module):
    """GcBlock (Cao et al. 2019) as FGD uses it: x + transform(softmax-pooled context of x)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mask = nn.Conv2d(channels, 1, 1)
        nn.init.kaiming_normal_(self.mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(cast(torch.Tensor, self.mask.bias))
        out = nn.Conv2d(channels // 2, channels, 1)
        nn.init.zeros_(out.weight)  # starts as the identity: x + 0
        nn.init.zeros_(cast(torch.Tensor, out.bias))
        self.transform = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 1),
            nn.LayerNorm([channels // 2, 1, 1]),
            nn.ReLU(inplace=True),
            out,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        weights = torch.softmax(self.mask(x).flatten(1), dim=1)  # (B, HW)
        context = (x.flatten(2) @ weights[:, :, None].to(x.dtype))[..., None]  # (B, C, 1, 1)
        return x + self.transform(context)


def fgd_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    fg: torch.Tensor,
    bg: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level's focal fg, focal bg and attention losses (unweighted); maps (B, C, H, W) of
    equal shape, fg/bg (B, H, W)."""
    b = student.shape[0]
    s_spatial, s_channel = attention(student, temperature)
    t_spatial, t_channel = attention(teacher, temperature)
    # The teacher's attention weights both sides: the student learns where the teacher looks.
    weight = t_spatial[:, None] * t_channel[:, :, None, None]
    err = (student.float() - teacher.float()) ** 2 * weight
    fg_loss = (err * fg[:, None]).sum() / b
    bg_loss = (err * bg[:, None]).sum() / b
    att = ((s_channel - t_channel).abs().sum() + (s_spatial - t_spatial).abs().sum()) / b
    return fg_loss, bg_loss, att


class FGD(nn.Module):
    def __init__(self, cfg: DistillConfig, levels: int, c_s: int, c_t: int) -> None:
        super().__init__()
        self.cfg = cfg.fgd
        self.adapters = nn.ModuleList(align(c_s, c_t) for _ in range(levels))
        self.context_s = nn.ModuleList(GlobalContext(c_t) for _ in range(levels))
        self.context_t = nn.ModuleList(GlobalContext(c_t) for _ in range(levels))

    def forward(
        self,
        student_maps: list[torch.Tensor],
        teacher_maps: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        batch_shape: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        sums: dict[str, list[torch.Tensor]] = {"fg": [], "bg": [], "att": [], "global": []}
        boxes = [target["boxes"] for target in targets]
        for level, (s, t) in enumerate(zip(student_maps, teacher_maps, strict=True)):
            s = self.adapters[level](s)
            fg, bg = box_masks(boxes, (t.shape[-2], t.shape[-1]), batch_shape)
            for key, value in zip(("fg", "bg", "att"), fgd_terms(s, t, fg, bg, cfg.temperature),
                                  strict=True):
                sums[key].append(value)
            gap = self.context_s[level](s).float() - self.context_t[level](t).float()
            sums["global"].append((gap**2).sum() / s.shape[0])
        weights = {"fg": cfg.alpha, "bg": cfg.beta, "att": cfg.gamma, "global": cfg.lam}
        return {f"loss_fgd_{k}": weights[k] * torch.stack(v).sum() for k, v in sums.items()}
