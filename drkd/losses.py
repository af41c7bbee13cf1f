"""Pure loss functions of DRKD (method.md, "Total loss" and "Reductions and weights").

``reduction="norm"`` is the release's: one un-squared L2 norm (``torch.dist``) of the
whole batch's difference tensor, summed (by the callers) over levels.
``reduction="mse"`` is the mean squared error over the valid
elements: scale-free across image and batch sizes. Weights tuned for one
reduction are meaningless for the other.
"""

from __future__ import annotations

import torch
from torch import nn

from drkd.modules.relation import pair_mask


def distance(
    student: torch.Tensor, teacher: torch.Tensor, reduction: str, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """student, teacher: (B, ...); valid: bool, broadcastable to them (None = all valid)."""
    diff = student.float() - teacher.float()
    if valid is not None:
        valid = valid.expand_as(diff)
        diff = torch.where(valid, diff, 0.0)
    if reduction == "norm":
        return diff.norm()
    count = diff.numel() if valid is None else int(valid.sum())
    return (diff**2).sum() / max(count, 1)


def level_sum(
    student: list[torch.Tensor], teacher: list[torch.Tensor], reduction: str
) -> torch.Tensor:
    """Sum over FPN levels of distance(student[l], teacher[l]); maps (B, C_t, H_l, W_l).

    L_PR when the inputs went through GloRe (and the student adapter); the `mimic` baseline
    when they are the adapted student and the raw teacher maps."""
    return torch.stack(
        [distance(s, t, reduction) for s, t in zip(student, teacher, strict=True)]
    ).sum()


pixel_relation_loss = level_sum  # L_PR, method.md "Pixel-wise relation distillation"


def related(mask: torch.Tensor) -> torch.Tensor:
    """(B, n) -> (B, 1) images with at least 2 instances: the only ones with relations."""
    return mask.sum(1, keepdim=True) >= 2


def instance_relation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    reduction: str,
    matrix: bool,
    self_pairs: bool = True,
) -> torch.Tensor:
    """L_IR for one level: relation matrices R (B, n, n) when ``matrix``, else refined
    features z (B, n, D). Images with 0 or 1 instance contribute exactly 0. A matrix row
    counts when it has at least 2 partners (``self_pairs``: the instance itself is one): a
    row of one partner is 1 on both sides and would only dilute the mean."""
    if matrix:
        pairs = pair_mask(mask, self_pairs)
        valid = pairs & (pairs.sum(-1, keepdim=True) >= 2)
    else:
        valid = (mask & related(mask))[:, :, None]
    return distance(student, teacher, reduction, valid)


def relation_filter_loss(
    scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """What trains the relation filter: binary cross-entropy of its scores (B, n, n) against
    "i and j are of the same class" (labels (B, n)), over the pairs of distinct instances of
    an image; 0 without such a pair. It reaches only the filter (the scores are computed from
    the teacher's detached features)."""
    pairs = pair_mask(mask, self_pairs=False)
    same = (labels[:, :, None] == labels[:, None, :]).float()
    bce = nn.functional.binary_cross_entropy_with_logits(scores, same, reduction="none")
    return torch.where(pairs, bce, 0.0).sum() / pairs.sum().clamp(min=1)


def instance_feature_loss(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, reduction: str
) -> torch.Tensor:
    """L_INS for one level: distance(adapt(e_s), e_t) over the valid instances; (B, n, D)."""
    return distance(student, teacher, reduction, mask[:, :, None])
