"""Graph reasoning unit (GloRe, Chen et al. CVPR 2019) for pixel-wise relation distillation.

method.md, "Pixel-wise relation distillation": pixels are projected onto N graph
nodes, a graph convolution reasons over nodes then states, and the result is
projected back and added to the input. The output BatchNorm starts at zero, so
a fresh unit is the identity and the distillation target starts as plain
feature imitation and can only add relational context to it.
"""

from __future__ import annotations

import torch
from torch import nn


class GloRe(nn.Module):
    def __init__(self, channels: int, nodes: int, states: int) -> None:
        super().__init__()
        self.to_states = nn.Conv2d(channels, states, 1)
        self.to_nodes = nn.Conv2d(channels, nodes, 1)
        self.node_conv = nn.Conv1d(nodes, nodes, 1)  # A: mixes nodes
        self.state_conv = nn.Conv1d(states, states, 1, bias=False)  # W_state: mixes states
        self.back = nn.Conv2d(states, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.norm.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, _, h, w = x.shape
        states = self.to_states(x).flatten(2)  # (B, S, HW)
        proj = self.to_nodes(x).flatten(2)  # (B, N, HW)
        # Divide by HW: detection inputs vary in size, node features should not.
        v = states @ proj.transpose(1, 2) / (h * w)  # (B, S, N)
        mixed = self.node_conv(v.transpose(1, 2)).transpose(1, 2)  # A(V): (B, S, N)
        z = self.state_conv(torch.relu(v + mixed))  # (B, S, N)
        y = (z @ proj).view(b, -1, h, w)  # (B, S, H, W)
        return x + self.norm(self.back(y))
