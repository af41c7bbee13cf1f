"""Distillation methods: one module each; ``build`` is the one place that picks.

A method is an ``nn.Module`` holding its training-only parts (adapters, generators,
relation blocks) whose ``forward(student_maps, teacher_maps, targets, batch_shape)`` returns
its weighted loss terms by name:

- ``student_maps``, ``teacher_maps``: the FPN maps, finest first, (B, C_s|C_t, H_l, W_l);
  the teacher's are detached.
- ``targets``: per image, the ground truth as the detector's transform left it: ``boxes``
  (K_i, 4) in padded-batch pixels (x1, y1, x2, y2) and ``labels`` (K_i,).
- ``batch_shape``: (H, W) of the padded batch the maps were computed from.

The Distiller owns everything else (hooks, the teacher, export): a new method is a new
module here, one entry in ``build``, its params section and name in ``drkd.config``
(``DistillConfig``, ``Method``) and its search space in ``TuneSpaces``.
"""

from __future__ import annotations

from torch import nn

from drkd.config import DistillConfig
from drkd.methods.cwd import CWD
from drkd.methods.drkd import DRKD
from drkd.methods.fgd import FGD
from drkd.methods.mgd import MGD
from drkd.methods.mimic import Mimic
from drkd.methods.pkd import PKD


def build(cfg: DistillConfig, levels: int, c_s: int, c_t: int) -> nn.Module | None:
    """The training-only modules of ``cfg.method`` for a pyramid of ``levels`` maps with
    C_s student and C_t teacher channels; None for ``none`` (plain training)."""
    methods = {"drkd": DRKD, "mimic": Mimic, "pkd": PKD, "cwd": CWD, "mgd": MGD, "fgd": FGD}
    return methods[cfg.method](cfg, levels, c_s, c_t) if cfg.method in methods else None
