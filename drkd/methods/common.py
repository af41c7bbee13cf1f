"""Pieces several methods share."""

from __future__ import annotations

from torch import nn


def align(c_s: int, c_t: int) -> nn.Module:
    """The student map brought to the teacher's width: a 1x1 convolution, or nothing when the
    widths already agree (PKD, CWD, MGD and FGD adapt only then)."""
    return nn.Conv2d(c_s, c_t, 1) if c_s != c_t else nn.Identity()
