"""Graph reasoning unit (GloRe, Chen et al. CVPR 2019) for pixel-wise relation distillation.

method.md, "Pixel-wise relation distillation": pixels are projected onto N graph
nodes, a graph convolution reasons over nodes then states, and the result is
projected back and added to the input. Ours starts its output BatchNorm's weight at
zero (``identity_start``), so a fresh unit is the identity and the distillation target
starts as plain feature imitation and can only add relational context to it; the release
(and ``identity_start=False``) start it at 1, so the target carries relations from step 0.

The 1x1 convolutions are matrix products on the (B, C, HW) pixels, regrouped so that no
(B, S, HW) tensor is formed: V = X_s B^T with X_s = W_s X + b_s is computed as W_s (X B^T) +
b_s (B 1)^T, and the output W_back (W_state R) B as (W_back W_state R) B. Per pixel that is
3 N C multiply-adds instead of (2 S + N) C + 2 S N (2x fewer at the release's N=64, S=128,
C=256); the function is the paper's (a test writes out its convolution form).
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

    def node_projection(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, HW) -> the projection onto the graph nodes B (B, N, HW)."""
        weight, bias = self.project.weight[self.states:], self.project.bias[self.states:]
        return weight @ pixels + bias[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W), in fp32 whatever the autocast: V sums HW products,
        and under fp16 it reaches 4e4 on a 100x168 map of RMS-2 features (fp16 overflows at
        65504); the unit is small next to the detector."""
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            pixels = x.flatten(2)  # (B, C, HW)
            proj = self.node_projection(pixels)  # (B, N, HW)
            w_states, b_states = self.project.weight[:self.states], self.project.bias[:self.states]
            v = (w_states @ (pixels @ proj.transpose(1, 2))  # (B, S, N)
                 + b_states[:, None] * proj.sum(2)[:, None])
            if self.normalize:  # / HW: detection inputs vary in size, node features should not
                v = v / pixels.shape[-1]
            relations = torch.relu(v + self.node_mix(v))  # (B, S, N); node_mix acts on the N axis
            y = (self.back.weight @ (self.state_mix.weight @ relations)) @ proj  # (B, C, HW)
            return (pixels + self._normalise(y)).view(x.shape)

    def _normalise(self, y: torch.Tensor) -> torch.Tensor:
        """BatchNorm over the B*HW pixels of y (B, C, HW). A single pixel in training (batch 1
        on a 1x1 map) has y - mean = 0, so BatchNorm's value is its bias, with zero gradient to
        y; torch raises instead. y stays in the graph: DDP expects a gradient for every weight."""
        if self.training and y.shape[0] * y.shape[2] == 1:
            return y * 0.0 * self.norm.weight[:, None] + self.norm.bias[:, None]
        return self.norm(y)
