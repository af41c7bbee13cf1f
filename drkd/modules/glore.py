"""Graph reasoning unit (GloRe, Chen et al. CVPR 2019) for pixel-wise relation distillation.

method.md, "Pixel-wise relation distillation": pixels are projected onto N graph
nodes, a graph convolution reasons over nodes then states, and the result is
projected back and added to the input. Ours starts its output BatchNorm's weight at
zero (``identity_start``), so a fresh unit is the identity and the distillation target
starts as plain feature imitation and can only add relational context to it; the release
(and ``identity_start=False``) start it at 1, so the target carries relations from step 0.

The 1x1 convolutions are written as linear layers on the (B, HW, C) pixels, and the
state and node projections share one matrix multiply: the same function as the
paper's convolutions, at about 60% of their cost on the small maps of a detector's
coarse levels (one GEMM per layer instead of a convolution call each).
"""

from __future__ import annotations

import torch
from torch import nn


class GloRe(nn.Module):
    def __init__(self, channels: int, nodes: int, states: int, release: bool = False,
                 identity_start: bool = True) -> None:
        """``release``: the authors' unit: no division by HW, BatchNorm eps 1e-4 and weight 1
        (so the target carries relations from the first step; ours starts as the identity).
        ``identity_start=False``: only the release's BatchNorm weight 1."""
        super().__init__()
        self.nodes, self.states, self.normalize = nodes, states, not release
        self.project = nn.Linear(channels, states + nodes)  # X_s (S rows) and B (N rows)
        self.node_mix = nn.Linear(nodes, nodes)  # A: a 1x1 conv across the node axis
        self.state_mix = nn.Linear(states, states, bias=False)  # W_state
        self.back = nn.Linear(states, channels, bias=False)
        # Over B*HW pixels: BatchNorm2d's statistics.
        self.norm = nn.BatchNorm1d(channels, eps=1e-4 if release else 1e-5)
        if identity_start and not release:
            nn.init.zeros_(self.norm.weight)

    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> pixel states X_s^T (B, HW, S) and node projection B^T (B, HW, N)."""
        pixels = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        states, proj = self.project(pixels).split([self.states, self.nodes], dim=-1)
        return states, proj

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> the unit's output as pixels (B, HW, C), the layout L_PR compares
        in (no transpose back, and the student adapter is a plain linear layer on it).

        Runs in fp32 whatever the autocast: V sums HW products, and under fp16 it reaches
        4e4 on a 100x168 map of RMS-2 features (fp16 overflows at 65504); the unit is small
        next to the detector."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            b, c, h, w = x.shape
            states, proj = self.projections(x)
            # Divide by HW: detection inputs vary in size, node features should not.
            v = states.transpose(1, 2) @ (proj / (h * w) if self.normalize else proj)  # (B,S,N)
            z = self.state_mix(torch.relu(v + self.node_mix(v)).transpose(1, 2))  # Z^T (B, N, S)
            y = self.back(proj @ z).flatten(0, 1)  # conv1x1(Z B) as (B*HW, C)
            return x.flatten(2).transpose(1, 2) + self._normalise(y).view(b, h * w, c)

    def _normalise(self, y: torch.Tensor) -> torch.Tensor:
        """BatchNorm over the B*HW pixels (B*HW, C). A single pixel in training (batch 1 on a
        1x1 map) has y - mean = 0, so BatchNorm's value is its bias, with zero gradient to y;
        torch raises instead. y stays in the graph: DDP expects a gradient for every weight."""
        if self.training and y.shape[0] == 1:
            return y * 0.0 * self.norm.weight + self.norm.bias
        return self.norm(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        return self.pixels(x).transpose(1, 2).reshape(x.shape)
