"""DRKD (Ni et al., IJCAI 2023): pixel-wise and instance-wise relation distillation
(method.md).

- L_PR: a GloRe unit per FPN level on each side; the student's output, adapted to the
  teacher's width, imitates the teacher's.
- L_INS: the RoIAlign 3x3 features of every ground-truth box (the finest ``instance.levels``
  levels), adapted, imitate the teacher's.
- L_IR: a relation block per level on each side turns those instance features into a relation
  matrix (optionally filtered); the student imitates the teacher's matrix and/or refined
  features (``instance.target``). The teacher's theta/phi stay as initialised (method.md,
  "Beware trivial solutions"; the release trains them), or the affinity is the
  parameter-free cosine similarity (``instance.similarity``). An instance is not its own
  partner (the release's non-local block keeps self-pairs).
- The relation filter (``instance.filter``) weights both sides' relations alike and is trained by
  its own term, ``loss_filter`` (same class or not, from the teacher's features), never by
  L_IR: trained by the loss it weights, it drove L_IR to zero whatever the student did.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn
from torch.profiler import record_function
from torchvision.ops import remove_small_boxes, roi_align

from drkd.config import DistillConfig, UserError
from drkd.losses import (
    instance_feature_loss,
    instance_relation_loss,
    pixel_relation_loss,
    relation_filter_loss,
)
from drkd.methods.pkd import standardise
from drkd.modules.glore import GloRe
from drkd.modules.relation import (
    InstanceRelation,
    RelationFilter,
    filter_logits,
    kept_pairs,
    pad_instances,
    pair_mask,
    relation_matrix,
    weights_of,
)

ROI_SIZE = 3  # method.md: RoIAlign 3x3 of every GT box


class DRKD(nn.Module):
    def __init__(self, cfg: DistillConfig, levels: int, c_s: int, c_t: int) -> None:
        super().__init__()
        self.cfg = cfg
        inst = cfg.instance
        # Built empty and filled by what params switch on: a term with weight 0 has no modules.
        self.glore_s = nn.ModuleList()
        self.glore_t = nn.ModuleList()
        self.pixel_adapters = nn.ModuleList()
        self.instance_adapters = nn.ModuleList()
        self.relation_s = nn.ModuleList()
        self.relation_t = nn.ModuleList()
        self.filters = nn.ModuleList()
        self.ir_adapters = nn.ModuleList()  # release only: on the student's refined features
        if cfg.w_pr > 0:
            sizes = cfg.pixel
            if len(sizes.nodes) < levels or len(sizes.states) < levels:
                raise UserError(
                    f"distill.pixel.nodes/states: the detector has {levels} FPN "
                    f"levels, got {len(sizes.nodes)} / {len(sizes.states)} sizes"
                )
            pairs = list(zip(sizes.nodes, sizes.states, strict=False))[:levels]
            start = sizes.identity_start
            # Refused here, not when params load, so that a record that ran it still loads.
            if sizes.freeze_teacher and start and not cfg.release:
                raise UserError(
                    "distill.pixel.freeze_teacher: a frozen unit that starts as the identity "
                    "passes the teacher's map through unchanged, so L_PR's target has no "
                    "relations; set pixel.identity_start: false with it")
            self.glore_s.extend(GloRe(c_s, n, s, cfg.release, start) for n, s in pairs)
            self.glore_t.extend(GloRe(c_t, n, s, cfg.release, start) for n, s in pairs)
            self.glore_t.requires_grad_(not sizes.freeze_teacher)
            self.pixel_adapters.extend(nn.Linear(c_s, c_t) for _ in range(levels))  # on pixels
        self.instance_levels = min(inst.levels, levels)
        self.has_instance_terms = cfg.w_ir > 0 or cfg.w_ins > 0
        # The release relates the student's unadapted features: its L_IR needs no adapter, and
        # an adapter without a gradient would stop DDP (unused parameters).
        if cfg.w_ins > 0 or (cfg.w_ir > 0 and not cfg.release):
            self.instance_adapters.extend(
                nn.Conv2d(c_s, c_t, 1) for _ in range(self.instance_levels)
            )
        if cfg.w_ir > 0:
            dim = c_t * ROI_SIZE * ROI_SIZE
            # The release relates the student's own (unadapted) instance features and embeds
            # each side to half its width; ours relates the adapted ones, embedded to embed_dim.
            dim_s = c_s * ROI_SIZE * ROI_SIZE if cfg.release else dim
            refine = inst.target != "matrix"
            learned = inst.similarity == "learned"
            for side, width in ((self.relation_s, dim_s), (self.relation_t, dim)):
                embed = width // 2 if cfg.release else inst.embed_dim
                side.extend(
                    InstanceRelation(width, embed, refine, cfg.release, learned)
                    for _ in range(self.instance_levels)
                )
            if cfg.release and refine:
                self.ir_adapters.extend(nn.Linear(dim_s, dim) for _ in range(self.instance_levels))
            # Anchor the teacher's relation matrix (method.md, "Beware trivial solutions"):
            # its embeddings stay as initialised, so the KD loss cannot collapse it.
            for block in self.relation_t if learned and not cfg.release else ():
                block.theta.requires_grad_(False)
                block.phi.requires_grad_(False)
            if inst.filter:
                self.filters.extend(
                    RelationFilter(dim, inst.filter_hidden) for _ in range(self.instance_levels)
                )

    def forward(
        self,
        student_maps: list[torch.Tensor],
        teacher_maps: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        batch_shape: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if len(self.glore_s):
            with record_function("drkd.pixel"):
                out["loss_pr"] = self.pixel_loss(student_maps, teacher_maps)
        if self.has_instance_terms:
            out.update(self.instance_losses(student_maps, teacher_maps, targets, batch_shape))
        return out

    def pixel_loss(self, student_maps: list[torch.Tensor],
                   teacher_maps: list[torch.Tensor]) -> torch.Tensor:
        """w_pr * L_PR over the levels: GloRe's outputs (B, C_t, H, W) of both sides, the
        student's adapted to the teacher's width."""
        cfg = self.cfg
        s_rel = [channel_linear(cast(nn.Linear, a), g(s)) for a, g, s in
                 zip(self.pixel_adapters, self.glore_s, student_maps, strict=False)]
        t_rel = [g(t) for g, t in zip(self.glore_t, teacher_maps, strict=False)]
        if cfg.pixel.standardize and not cfg.release:  # the release compares raw outputs
            s_rel, t_rel = [standardise(x) for x in s_rel], [standardise(x) for x in t_rel]
        return cfg.w_pr * pixel_relation_loss(s_rel, t_rel, cfg.reduction)

    def instance_losses(
        self,
        student_maps: list[torch.Tensor],
        teacher_maps: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        batch_shape: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        rois, image_index, labels = instance_rois(targets)
        # The same layout at every level: padded once, for the filter's loss.
        padded_labels = pad_labels(labels, image_index, len(targets)) if len(self.filters) else None
        ir, ins, filter_terms = [], [], []
        for level in range(self.instance_levels):
            e_s, e_t, mask, related_s = self.instance_features(
                level, student_maps, teacher_maps, rois, image_index, batch_shape
            )
            if cfg.w_ins > 0:
                ins.append(instance_feature_loss(e_s, e_t, mask, cfg.reduction))
            if cfg.w_ir > 0:
                loss, scores = self.relation_loss(level, related_s, e_t, mask)
                ir.append(loss)
                if scores is not None and padded_labels is not None:
                    filter_terms.append(relation_filter_loss(scores, padded_labels, mask))
        out = {}
        if ins:
            out["loss_ins"] = cfg.w_ins * torch.stack(ins).sum()
        if ir:
            out["loss_ir"] = cfg.w_ir * torch.stack(ir).sum()
        if filter_terms:  # unweighted: it trains the filter alone
            out["loss_filter"] = torch.stack(filter_terms).sum()
        return out

    def relation_matrices(
        self,
        student_maps: list[torch.Tensor],
        teacher_maps: list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]],
        batch_shape: tuple[int, int],
        level: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One instance level's relation matrices R_s, R_t (B, n, n) and mask (B, n), exactly as
        L_IR computes them (for relation plots). Instances: the non-degenerate boxes, in order."""
        if not len(self.relation_s):
            raise ValueError("no instance relation modules: the distill config has w_ir = 0")
        rois, image_index, _ = instance_rois(targets)
        _, e_t, mask, related_s = self.instance_features(
            level, student_maps, teacher_maps, rois, image_index, batch_shape
        )
        r_s, r_t, _ = self.matrices(level, related_s, e_t, mask)
        return r_s, r_t, mask

    def instance_features(
        self,
        level: int,
        student_maps: list[torch.Tensor],
        teacher_maps: list[torch.Tensor],
        rois: torch.Tensor,
        image_index: torch.Tensor,
        batch_shape: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """RoIAlign of one level -> padded e_s (adapted), e_t (B, n, C_t*9), mask (B, n) and
        the student features L_IR relates: e_s, or for the release the unadapted ones
        (B, n, C_s*9). Without an adapter (the release's L_IR alone) e_s is unadapted too;
        nothing reads it then."""
        s_map, t_map = student_maps[level], teacher_maps[level]
        # Spatial scale as MultiScaleRoIAlign infers it: a power of two.
        scale = 2.0 ** round(math.log2(s_map.shape[-1] / batch_shape[1]))
        # Pooled in fp32 with fp32 boxes: under bf16 autocast, boxes cast to the map's dtype
        # move by several pixels at COCO sizes (1210.6 -> 1208).
        # The 1x1 adapter commutes with RoIAlign's bilinear sampling (GT boxes lie inside the
        # map), so adapt the K pooled 3x3 patches rather than the whole map: same features,
        # and RoIAlign's backward runs on the student's C_s channels instead of C_t.
        # The release: aligned=False, adaptive sampling (pooled features differ by 21-55%).
        align = {"sampling_ratio": -1, "aligned": False} if self.cfg.release else {
            "sampling_ratio": 2, "aligned": True}
        with record_function("drkd.roi_align"):
            raw = roi_align(s_map.float(), rois, ROI_SIZE, scale, **align)
            pooled_t = roi_align(t_map.float(), rois, ROI_SIZE, scale, **align)
        pooled_s = self.instance_adapters[level](raw) if len(self.instance_adapters) else raw
        batch = s_map.shape[0]
        e_s, mask = pad_instances(pooled_s.flatten(1), image_index, batch)
        e_t, _ = pad_instances(pooled_t.flatten(1), image_index, batch)
        if not self.cfg.release or pooled_s is raw:  # no adapter: e_s is the raw features
            return e_s, e_t, mask, e_s
        raw_s, _ = pad_instances(raw.flatten(1), image_index, batch)
        return e_s, e_t, mask, raw_s

    def matrices(
        self, level: int, e_s: torch.Tensor, e_t: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """R_s, R_t (B, n, n) of one level and the filter's scores (B, n, n; None without a
        filter). The filter judges relations on the teacher's features and weights both sides
        alike; its weights are a constant to L_IR (detached), so L_IR cannot train it. With
        top-k, both matrices spread over the teacher's k strongest partners of each row."""
        inst, self_pairs = self.cfg.instance, self.cfg.release
        block_s = cast(InstanceRelation, self.relation_s[level])
        block_t = cast(InstanceRelation, self.relation_t[level])
        scores, weights = None, None
        if len(self.filters):
            with record_function("drkd.filter"):
                scores = cast(RelationFilter, self.filters[level]).scores(e_t)
                weights = weights_of(scores.detach(), mask)
        with record_function("drkd.relation_matrices"):
            a_s, a_t = block_s.affinity(e_s), block_t.affinity(e_t)
            # Both sides relate over the teacher's strongest partners: with each side's own
            # top-k, a partner the teacher keeps and the student does not is 0 in R_s with no
            # gradient, so the student could never be pulled toward it.
            teacher = filter_logits(a_t.detach(), inst.tau, weights)
            keep = kept_pairs(teacher, pair_mask(mask, self_pairs), inst.topk)
            r_s = relation_matrix(a_s, mask, inst.tau, weights=weights, keep=keep)
            r_t = relation_matrix(a_t, mask, inst.tau, weights=weights, keep=keep)
        return r_s, r_t, scores

    def relation_loss(
        self, level: int, e_s: torch.Tensor, e_t: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One level's L_IR and the filter's scores (``matrices``); e_s (adapted; release:
        unadapted), e_t: (B, n, D), mask (B, n)."""
        inst, reduction = self.cfg.instance, self.cfg.reduction
        r_s, r_t, scores = self.matrices(level, e_s, e_t, mask)
        loss = e_s.new_zeros((), dtype=torch.float32)
        if inst.target in ("matrix", "both"):
            loss = loss + instance_relation_loss(
                r_s, r_t, mask, reduction, matrix=True, self_pairs=self.cfg.release
            )
        if inst.target in ("features", "both"):
            block_s = cast(InstanceRelation, self.relation_s[level])
            block_t = cast(InstanceRelation, self.relation_t[level])
            z_s, z_t = block_s.refine(e_s, r_s), block_t.refine(e_t, r_t)
            if len(self.ir_adapters):  # the release adapts after the block
                z_s = self.ir_adapters[level](z_s)
            loss = loss + instance_relation_loss(z_s, z_t, mask, reduction, matrix=False)
        return loss, scores


def drkd_part(method: nn.Module | None) -> DRKD | None:
    """DRKD's module in a Distiller's method: the method itself, or its part in a combination
    (another method with ``plus: [drkd]``); None without one."""
    for part in getattr(method, "parts", [method]):
        if isinstance(part, DRKD):
            return part
    return None


def channel_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer across the channels of a map: (B, C_in, H, W) -> (B, C_out, H, W), as a
    1x1 convolution with the layer's weights."""
    return nn.functional.conv2d(x, linear.weight[:, :, None, None], linear.bias)


def instance_rois(
    targets: list[dict[str, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every non-degenerate GT box of the batch as fp32 RoIAlign rois (K, 5), its image (K,)
    and its label (K,)."""
    boxes = [t["boxes"] for t in targets]
    image_index = torch.cat(
        [torch.full((len(b),), i, dtype=torch.long, device=b.device) for i, b in enumerate(boxes)]
    )
    boxes_all = torch.cat(boxes).float()
    labels = torch.cat([t["labels"] for t in targets]).to(image_index.device)
    keep = instances(boxes_all)
    boxes_all, image_index, labels = boxes_all[keep], image_index[keep], labels[keep]
    return torch.cat([image_index[:, None].float(), boxes_all], dim=1), image_index, labels


def pad_labels(labels: torch.Tensor, image_index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(K,) labels -> (B, n_max), laid out as ``pad_instances`` lays out the features."""
    padded, _ = pad_instances(labels[:, None].float(), image_index, batch_size)
    return padded[..., 0].long()


def instances(boxes: torch.Tensor) -> torch.Tensor:
    """(K, 4) -> the indices (K',) of the boxes that are instances: degenerate boxes (w or h
    < 1 px) are not (method.md, "Pitfalls")."""
    return remove_small_boxes(boxes, 1.0)
