"""Distiller: a student detector, a frozen teacher and the training-only DRKD modules.

``Distiller(student, teacher, cfg)(images, targets)`` returns the student's
detection losses plus the weighted distillation terms (``loss_pr``,
``loss_ir``, ``loss_ins`` or ``loss_mimic``), so the shared training loop
trains it like any detector. The teacher runs only its backbone, under
``no_grad``, on the student's transformed batch (method.md, "Pitfalls"); it is
frozen, kept in eval mode, and never saved with the student. Only
``distiller.student`` is exported: a plain torchvision detector.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn
from torchvision.ops import roi_align

from drkd.config import DistillConfig, UserError, to_dict
from drkd.losses import (
    instance_feature_loss,
    instance_relation_loss,
    level_sum,
    pixel_relation_loss,
)
from drkd.modules.glore import GloRe
from drkd.modules.relation import InstanceRelation, RelationFilter, pad_instances, relation_matrix
from drkd.taps import capture, part

ROI_SIZE = 3  # method.md: RoIAlign 3x3 of every GT box


def _adapter(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1)


def check_compatible(student: nn.Module, teacher: nn.Module) -> tuple[int, int, int]:
    """Refuse a teacher whose preprocessing or pyramid differs; return (levels, C_s, C_t)."""
    s, t = part(student, "transform"), part(teacher, "transform")
    for name in ("image_mean", "image_std", "min_size", "max_size"):
        if (
            list(getattr(s, name)) != list(getattr(t, name))
            if isinstance(getattr(s, name), list | tuple)
            else getattr(s, name) != getattr(t, name)
        ):
            raise UserError(
                f"teacher and student transforms differ in {name}: "
                f"{getattr(t, name)} vs {getattr(s, name)}; they must see the same batch"
            )
    probe = torch.zeros(1, 3, 128, 128)
    with torch.no_grad():
        was = student.training, teacher.training
        student.eval(), teacher.eval()
        fs, ft = part(student, "backbone")(probe), part(teacher, "backbone")(probe)
        student.train(was[0]), teacher.train(was[1])
    s_shapes = [tuple(f.shape[-2:]) for f in fs.values()]
    t_shapes = [tuple(f.shape[-2:]) for f in ft.values()]
    if s_shapes != t_shapes:
        raise UserError(
            f"teacher and student pyramids differ: teacher levels {t_shapes} vs "
            f"student {s_shapes} (on a 128 px probe)"
        )
    return len(s_shapes), _width(student), _width(teacher)


def _width(detector: nn.Module) -> int:
    return int(cast(int, part(detector, "backbone").out_channels))


class Distiller(nn.Module):
    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> None:
        super().__init__()
        levels, c_s, c_t = check_compatible(student, teacher)
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        inst = cfg.instance
        # Built empty and filled by what params switch on: a term with weight 0 has no modules.
        self.mimic_adapters = nn.ModuleList()
        self.glore_s = nn.ModuleList()
        self.glore_t = nn.ModuleList()
        self.pixel_adapters = nn.ModuleList()
        self.instance_adapters = nn.ModuleList()
        self.relation_s = nn.ModuleList()
        self.relation_t = nn.ModuleList()
        self.filters = nn.ModuleList()
        if cfg.method == "mimic" and cfg.w_mimic > 0:
            self.mimic_adapters.extend(_adapter(c_s, c_t) for _ in range(levels))
        if cfg.method == "drkd" and cfg.w_pr > 0:
            sizes = cfg.pixel
            if len(sizes.nodes) < levels or len(sizes.states) < levels:
                raise UserError(
                    f"distill.pixel.nodes/states: the detector has {levels} FPN "
                    f"levels, got {len(sizes.nodes)} / {len(sizes.states)} sizes"
                )
            self.glore_s.extend(
                GloRe(c_s, n, s) for n, s in zip(sizes.nodes, sizes.states, strict=False)
            )
            self.glore_t.extend(
                GloRe(c_t, n, s) for n, s in zip(sizes.nodes, sizes.states, strict=False)
            )
            del self.glore_s[levels:], self.glore_t[levels:]
            self.pixel_adapters.extend(nn.Linear(c_s, c_t) for _ in range(levels))  # on pixels
        self.instance_levels = min(inst.levels, levels)
        if cfg.method == "drkd" and (cfg.w_ir > 0 or cfg.w_ins > 0):
            self.instance_adapters.extend(_adapter(c_s, c_t) for _ in range(self.instance_levels))
        if cfg.method == "drkd" and cfg.w_ir > 0:
            dim = c_t * ROI_SIZE * ROI_SIZE
            refine = inst.target != "matrix"
            for side in (self.relation_s, self.relation_t):
                side.extend(
                    InstanceRelation(dim, inst.embed_dim, refine)
                    for _ in range(self.instance_levels)
                )
            # Anchor the teacher's relation matrix (method.md, "Beware trivial solutions"):
            # its embeddings stay as initialised, so the KD loss cannot collapse it.
            for block in self.relation_t:
                block.theta.requires_grad_(False)
                block.phi.requires_grad_(False)
            if inst.filter:
                self.filters.extend(
                    RelationFilter(dim, inst.filter_hidden) for _ in range(self.instance_levels)
                )

    def modules_checkpoint(self) -> dict[str, Any]:
        """The training-only DRKD modules (not the student, not the teacher) and their config,
        for relation plots; the exported student never needs them."""
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
        assert tap.images is not None and tap.targets is not None
        with torch.no_grad():
            features = part(self.teacher, "backbone")(tap.images.tensors)
            teacher_maps = [f.detach() for f in features.values()]
        losses.update(
            self.distill_losses(
                tap.features, teacher_maps, tap.targets, tap.images.tensors.shape[-1]
            )
        )
        return losses

    def distill_losses(
        self,
        student_maps: list[torch.Tensor],
        teacher_maps: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        padded_width: int,
    ) -> dict[str, torch.Tensor]:
        """FPN maps finest first, (B, C, H_l, W_l); targets with boxes in batch coordinates."""
        cfg, out = self.cfg, {}
        if len(self.mimic_adapters):
            adapted = [a(s) for a, s in zip(self.mimic_adapters, student_maps, strict=False)]
            out["loss_mimic"] = cfg.w_mimic * level_sum(adapted, teacher_maps, "mse")
        if len(self.glore_s):
            glore_s = cast(list[GloRe], self.glore_s)
            glore_t = cast(list[GloRe], self.glore_t)
            s_rel = [
                a(g.pixels(s))
                for a, g, s in zip(self.pixel_adapters, glore_s, student_maps, strict=False)
            ]
            t_rel = [g.pixels(t) for g, t in zip(glore_t, teacher_maps, strict=False)]
            out["loss_pr"] = cfg.w_pr * pixel_relation_loss(s_rel, t_rel, cfg.reduction)
        if len(self.instance_adapters):
            out.update(self.instance_losses(student_maps, teacher_maps, targets, padded_width))
        return out

    def instance_losses(
        self,
        student_maps: list[torch.Tensor],
        teacher_maps: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        padded_width: int,
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        rois, image_index = _instance_rois(targets)
        ir, ins = [], []
        for level in range(self.instance_levels):
            e_s, e_t, mask = self._instance_features(
                level, student_maps, teacher_maps, rois, image_index, padded_width
            )
            if cfg.w_ins > 0:
                ins.append(instance_feature_loss(e_s, e_t, mask, cfg.reduction))
            if cfg.w_ir > 0:
                ir.append(self._relation_loss(level, e_s, e_t, mask))
        out = {}
        if ins:
            out["loss_ins"] = cfg.w_ins * torch.stack(ins).sum()
        if ir:
            out["loss_ir"] = cfg.w_ir * torch.stack(ir).sum()
        return out

    def relation_matrices(
        self,
        student_maps: list[torch.Tensor],
        teacher_maps: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        padded_width: int,
        level: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One instance level's relation matrices R_s, R_t (B, n, n) and mask (B, n), exactly as
        L_IR computes them (for relation plots). Instances: the non-degenerate boxes, in order."""
        if not len(self.relation_s):
            raise ValueError("no instance relation modules: the distill config has w_ir = 0")
        rois, image_index = _instance_rois(targets)
        e_s, e_t, mask = self._instance_features(
            level, student_maps, teacher_maps, rois, image_index, padded_width
        )
        r_s, r_t = self._matrices(level, e_s, e_t, mask)
        return r_s, r_t, mask

    def _instance_features(
        self,
        level: int,
        student_maps: list[torch.Tensor],
        teacher_maps: list[torch.Tensor],
        rois: torch.Tensor,
        image_index: torch.Tensor,
        padded_width: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RoIAlign of one level -> padded e_s (adapted), e_t (B, n, C*9) and mask (B, n)."""
        s_map, t_map = student_maps[level], teacher_maps[level]
        # Spatial scale as MultiScaleRoIAlign infers it: a power of two.
        scale = 2.0 ** round(math.log2(s_map.shape[-1] / padded_width))
        # The 1x1 adapter commutes with RoIAlign's bilinear sampling (GT boxes lie inside the
        # map), so adapt the K pooled 3x3 patches rather than the whole map: same features,
        # and RoIAlign's backward runs on the student's C_s channels instead of C_t.
        pooled_s = self.instance_adapters[level](
            roi_align(s_map, rois.to(s_map.dtype), ROI_SIZE, scale, sampling_ratio=2, aligned=True)
        )
        pooled_t = roi_align(
            t_map, rois.to(t_map.dtype), ROI_SIZE, scale, sampling_ratio=2, aligned=True
        )
        batch = s_map.shape[0]
        e_s, mask = pad_instances(pooled_s.flatten(1), image_index, batch)
        e_t, _ = pad_instances(pooled_t.flatten(1), image_index, batch)
        return e_s, e_t, mask

    def _matrices(
        self, level: int, e_s: torch.Tensor, e_t: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inst = self.cfg.instance
        block_s = cast(InstanceRelation, self.relation_s[level])
        block_t = cast(InstanceRelation, self.relation_t[level])
        # The filter judges relations on the teacher's features and weights both sides alike.
        weights = self.filters[level](e_t, mask) if len(self.filters) else None
        r_s = relation_matrix(block_s.affinity(e_s), mask, inst.tau, inst.topk, weights)
        r_t = relation_matrix(block_t.affinity(e_t), mask, inst.tau, inst.topk, weights)
        return r_s, r_t

    def _relation_loss(
        self, level: int, e_s: torch.Tensor, e_t: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """One level's L_IR; e_s (adapted), e_t: (B, n, D), mask (B, n)."""
        inst, reduction = self.cfg.instance, self.cfg.reduction
        r_s, r_t = self._matrices(level, e_s, e_t, mask)
        loss = e_s.new_zeros(())
        if inst.target in ("matrix", "both"):
            loss = loss + instance_relation_loss(r_s, r_t, mask, reduction, matrix=True)
        if inst.target in ("features", "both"):
            block_s = cast(InstanceRelation, self.relation_s[level])
            block_t = cast(InstanceRelation, self.relation_t[level])
            z_s, z_t = block_s.refine(e_s, r_s), block_t.refine(e_t, r_t)
            loss = loss + instance_relation_loss(z_s, z_t, mask, reduction, matrix=False)
        return loss


def _instance_rois(targets: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every non-degenerate GT box of the batch as RoIAlign rois (K, 5), and its image (K,)."""
    boxes = [t["boxes"] for t in targets]
    image_index = torch.cat(
        [torch.full((len(b),), i, dtype=torch.long, device=b.device) for i, b in enumerate(boxes)]
    )
    boxes_all = torch.cat(boxes)
    # Degenerate boxes are not instances (method.md, "Pitfalls").
    keep = ((boxes_all[:, 2] - boxes_all[:, 0]) >= 1) & ((boxes_all[:, 3] - boxes_all[:, 1]) >= 1)
    boxes_all, image_index = boxes_all[keep], image_index[keep]
    return torch.cat([image_index[:, None].to(boxes_all.dtype), boxes_all], dim=1), image_index
