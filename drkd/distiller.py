"""Distiller: a student detector, a frozen teacher and one distillation method's modules.

``Distiller(student, teacher, cfg)(images, targets)`` returns the student's
detection losses plus the weighted terms of ``cfg.method`` (drkd.methods), so the
shared training loop trains it like any detector. The teacher runs only its
backbone, under ``no_grad``, on the student's transformed batch (method.md,
"Pitfalls"); it is frozen, kept in eval mode, and never saved with the student.
Only ``distiller.student`` is exported: a plain torchvision detector.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.profiler import record_function
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from drkd.checkpoint import check_categories, load_detector
from drkd.config import DistillConfig, UserError, to_dict
from drkd.data.coco import CocoDetection
from drkd.methods import build
from drkd.taps import capture, part


def probe_shape(detector: nn.Module) -> tuple[int, int]:
    """The largest batch the detector's transform makes: (min_size, max_size), each rounded up
    to its size_divisible (32): non-square unless min_size == max_size."""
    transform = cast(GeneralizedRCNNTransform, part(detector, "transform"))
    sides = (min(transform.min_size), transform.max_size)
    divisible = transform.size_divisible
    return cast(tuple[int, int], tuple(-(-int(s) // divisible) * divisible for s in sides))


def check_compatible(student: nn.Module, teacher: nn.Module) -> tuple[int, int, int]:
    """Refuse a teacher whose preprocessing or pyramid differs; return (levels, C_s, C_t)."""
    s, t = part(student, "transform"), part(teacher, "transform")
    for name in ("image_mean", "image_std", "min_size", "max_size"):
        s_value, t_value = getattr(s, name), getattr(t, name)
        if isinstance(s_value, list | tuple):  # torchvision keeps lists or tuples: compare items
            s_value, t_value = list(s_value), list(t_value)
        if s_value != t_value:
            raise UserError(
                f"teacher and student transforms differ in {name}: "
                f"{getattr(t, name)} vs {getattr(s, name)}; they must see the same batch"
            )
    # The pyramids are compared on the batch shape training produces (same transform, so the
    # same for both), not a fixed square: strides that agree at one size may not at another.
    height, width = probe_shape(student)
    probe = torch.zeros(1, 3, height, width)
    with torch.no_grad():
        was = student.training, teacher.training
        student.eval()
        teacher.eval()
        fs, ft = (part(m, "backbone")(probe.to(next(m.parameters()).device))
                  for m in (student, teacher))
        student.train(was[0])
        teacher.train(was[1])
    s_shapes = [tuple(f.shape[-2:]) for f in fs.values()]
    t_shapes = [tuple(f.shape[-2:]) for f in ft.values()]
    if s_shapes != t_shapes:
        raise UserError(
            f"teacher and student pyramids differ: teacher levels {t_shapes} vs "
            f"student {s_shapes} (on a {height}x{width} probe)"
        )
    return len(s_shapes), _width(student), _width(teacher)


def start_from_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Copy every weight and buffer of the teacher outside its backbone's body (the FPN and
    the head) into the student, as the official FGD and MGD configs' ``init_student`` does:
    the student then differs from the teacher in its body alone. Refused (one line) unless the
    student has exactly those tensors in the same shapes."""
    def neck_and_head(detector: nn.Module) -> dict[str, torch.Tensor]:
        state = detector.state_dict()
        return {k: v for k, v in state.items() if not k.startswith("backbone.body.")}

    theirs, ours = neck_and_head(teacher), neck_and_head(student)
    for key in sorted(theirs.keys() | ours.keys()):
        t_shape = tuple(theirs[key].shape) if key in theirs else "absent"
        s_shape = tuple(ours[key].shape) if key in ours else "absent"
        if t_shape != s_shape:
            raise UserError(
                f"distill.init_student: the teacher's {key} is {t_shape}, the student's "
                f"{s_shape}; it needs the same neck and head (FPN width, head, classes)")
    student.load_state_dict(theirs, strict=False)


def _width(detector: nn.Module) -> int:
    return int(cast(int, part(detector, "backbone").out_channels))


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> None:
        super().__init__()
        levels, c_s, c_t = check_compatible(student, teacher)
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        # Method none is the baseline: never started from the teacher (as method_distill says).
        if cfg.method != "none" and cfg.init_student:
            start_from_teacher(student, teacher)
        self.method = build(cfg, levels, c_s, c_t)  # None: plain training (method `none`)

    def modules_checkpoint(self) -> dict[str, Any]:
        """The method's training-only modules (not the student, not the teacher) and their
        config, for relation plots; the exported student never needs them."""
        state = {
            k: v.detach().cpu()
            for k, v in self.state_dict().items()
            if not k.startswith(("student.", "teacher."))
        }
        return {"modules": state, "distill_config": to_dict(self.cfg)}

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # frozen: BatchNorm statistics included
        return self

    def forward(
        self, images: list[torch.Tensor], targets: list[dict[str, Any]]
    ) -> dict[str, torch.Tensor]:
        with capture(self.student) as tap:
            losses = dict(self.student(images, targets))
        if self.method is None:
            return losses
        assert tap.images is not None and tap.targets is not None
        batch = tap.images.tensors
        # The labels name the parts in a torch.profiler trace (benchmarks.paper_scale).
        with torch.no_grad(), record_function("distill.teacher"):
            teacher_maps = list(part(self.teacher, "backbone")(batch).values())
        shape = tuple(batch.shape[-2:])
        with record_function("distill.method"):
            losses.update(self.method(tap.features, teacher_maps, tap.targets, shape))
        return losses


def load_teacher(path: str | Path, dataset: CocoDetection) -> nn.Module:
    """The teacher checkpoint, refused (one line) when it was trained on other categories than
    ``dataset``. Leaves the RNG alone (drkd.checkpoint), so the modules built after it start as
    a tuning trial's do."""
    teacher, state = load_detector(path)
    check_categories(path, state, dataset)
    return teacher

