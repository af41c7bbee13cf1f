"""Instance-wise relation block and the learned relation filter (method.md, "Instance-wise
relation distillation").

Instances of a batch are padded to (B, n, D) with a validity mask (B, n), so
relations are computed for the whole batch at once and never cross images.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# A large finite negative (not -inf): a row with no valid entry must give a finite softmax
# (zeroed afterwards), or its NaNs would leak into the backward pass.
_MASKED = -1e9


def pad_instances(
    features: torch.Tensor, image_index: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, D) features with their image index (K,) -> padded (B, n_max, D), mask (B, n_max).

    Instances keep their order within each image; no Python loop over images.
    """
    counts = torch.bincount(image_index, minlength=batch_size)
    n_max = int(counts.max()) if counts.numel() else 0
    order = torch.argsort(image_index, stable=True)
    features, image_index = features[order], image_index[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(image_index), device=features.device) - starts[image_index]
    padded = features.new_zeros(batch_size, n_max, features.shape[1])
    padded[image_index, slot] = features
    mask = torch.zeros(batch_size, n_max, dtype=torch.bool, device=features.device)
    mask[image_index, slot] = True
    return padded, mask


def pair_mask(mask: torch.Tensor, self_pairs: bool = True) -> torch.Tensor:
    """(B, n) instance mask -> (B, n, n) valid (i, j) pairs of the same image; without
    ``self_pairs`` the diagonal (i, i) is not a pair."""
    pairs = mask[:, :, None] & mask[:, None, :]
    if self_pairs:
        return pairs
    return pairs & ~torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)


# The filter's weights lie in [FILTER_MIN, FILTER_MIN + 1]: a neutral 1 at init, never 0, so no
# training of the filter can flatten an image's relations (weights 0 make every row uniform on
# both sides) or give one partner all of a row (the old softmax-times-n weights did both).
FILTER_MIN = 0.5


class RelationFilter(nn.Module):
    """Scores every pair (i, j) of an image from the teacher's instance features and turns the
    scores into weights on the relations' softmax numerators, so the valuable relations stand
    out.

    A score is the logit that i and j are of the same class (``scores``; trained by
    ``drkd.losses.relation_filter_loss`` on the ground-truth labels, never by the relation
    loss it weights: a filter trained by that loss learns to hide the pairs the student gets
    wrong, down to a zero loss). Weights are ``FILTER_MIN + sigmoid(score)``: bounded, 1 at a
    zero score. Its input is layer-normalised (no affine): the teacher's raw instance features
    have norms in the tens, which saturates the scores at initialisation (a BCE of ~6 per level
    instead of ~0.7). Defined for any n, including 0 and 1.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, hidden)
        self.key = nn.Linear(dim, hidden)
        self.scale = 1 / math.sqrt(hidden)

    def scores(self, e: torch.Tensor) -> torch.Tensor:
        """e: (B, n, D) -> same-class logits (B, n, n), fp32. Padding rows get scores too (the
        biases): every use masks them (``weights_of``, ``relation_filter_loss``)."""
        e = nn.functional.layer_norm(e, e.shape[-1:])
        return ((self.query(e) @ self.key(e).transpose(1, 2)) * self.scale).float()

    def forward(self, e: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """e: (B, n, D), mask: (B, n) -> weights (B, n, n), zero on invalid pairs."""
        return weights_of(self.scores(e), mask)


def weights_of(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Filter scores (B, n, n) -> weights in (FILTER_MIN, FILTER_MIN + 1), zero on invalid
    pairs."""
    return torch.where(pair_mask(mask), FILTER_MIN + torch.sigmoid(scores), 0.0)


def kept_pairs(filtered: torch.Tensor, valid: torch.Tensor, topk: int = 0) -> torch.Tensor:
    """The pairs (B, n, n) a relation matrix spreads over, from its filtered logits (B, n, n;
    ``filter_logits``) and valid pairs (B, n, n; ``pair_mask``): every valid pair, or with
    ``topk`` > 0 the k strongest of each row (ties kept)."""
    if not topk or filtered.shape[-1] <= topk:
        return valid
    ranked = filtered.masked_fill(~valid, _MASKED)
    kth = ranked.topk(topk, dim=-1).values[..., -1:]
    return valid & (ranked >= kth)


def filter_logits(logits: torch.Tensor, tau: float,
                  weights: torch.Tensor | None) -> torch.Tensor:
    """Affinity logits (B, n, n) -> logits / tau + log w (fp32): the filter's weights w (B, n, n)
    multiply each relation's softmax numerator, w_ij exp(a_ij / tau). A weight then means the
    same whatever the logit's sign, and weights equal along a row change nothing (multiplying
    the logits instead would turn a cosine below 0 further down, and scale the temperature)."""
    scaled = logits.float() / tau
    return scaled if weights is None else scaled + weights.clamp_min(1e-12).log()


def relation_matrix(
    logits: torch.Tensor,
    mask: torch.Tensor,
    tau: float,
    topk: int = 0,
    weights: torch.Tensor | None = None,
    self_pairs: bool = True,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """R_ij = w_ij exp(a_ij / tau) / sum_m w_im exp(a_im / tau) over the kept pairs m of row i,
    with w the filter's ``weights`` (none: 1); (B, n, n), rows of invalid instances are 0.
    ``keep`` (B, n, n): the pairs to spread over, as ``kept_pairs`` gives them (L_IR passes the
    teacher's, so both sides relate over the same partners); default: this matrix's own
    (``topk`` > 0 keeps the k strongest filtered relations of each row).
    Without ``self_pairs`` an instance is not its own partner (R_ii = 0): a parameter-free
    cosine gives every self-pair the row's largest logit (1 / tau), which would dominate
    every row; a row with no partner (an image of one instance) is 0."""
    filtered = filter_logits(logits, tau, weights)
    if keep is None:
        keep = kept_pairs(filtered, pair_mask(mask, self_pairs), topk)
    return torch.where(keep, torch.softmax(filtered.masked_fill(~keep, _MASKED), dim=-1), 0.0)


def cosine_similarity(e: torch.Tensor) -> torch.Tensor:
    """(B, n, D) -> cos(e_i, e_j) (B, n, n) in fp32, whatever the autocast (in bf16 a cosine
    moves by ~4e-3, 0.04 in a logit at tau 0.1, and distinct ones tie); zero rows (padding)
    give 0."""
    with torch.autocast(e.device.type, enabled=False):
        unit = nn.functional.normalize(e.float(), dim=-1)
        return unit @ unit.transpose(1, 2)


class InstanceRelation(nn.Module):
    """Non-local block over the instances of one image (batched over images).

    ``affinity(e)`` gives a_ij = <theta(e_i), phi(e_j)> / sqrt(d); ``refine(e, R)``
    gives z = e + W(R g(e)). W starts at zero, so z = e at the start. Without ``refine``
    (a matrix-only target) g and W are not built: no parameter is left without a gradient.
    """

    def __init__(self, dim: int, embed: int, refine: bool = True, release: bool = False,
                 learned: bool = True) -> None:
        """``release``: the authors' block: affinity without the 1/sqrt(d) scale and W with
        PyTorch's default init (ours starts at zero: z = e). ``learned=False``: the affinity is
        the parameter-free cosine similarity (theta/phi are not built)."""
        super().__init__()
        if learned:
            self.theta = nn.Linear(dim, embed)
            self.phi = nn.Linear(dim, embed)
        self.learned = learned
        self.scale = 1.0 if release else 1 / math.sqrt(embed)
        if refine:
            self.g = nn.Linear(dim, embed)
            self.out = nn.Linear(embed, dim)
            if not release:
                nn.init.zeros_(self.out.weight)
                nn.init.zeros_(self.out.bias)

    def affinity(self, e: torch.Tensor) -> torch.Tensor:
        """(B, n, D) -> logits (B, n, n)."""
        if not self.learned:
            return cosine_similarity(e)
        return (self.theta(e) @ self.phi(e).transpose(1, 2)) * self.scale

    def refine(self, e: torch.Tensor, relation: torch.Tensor) -> torch.Tensor:
        """(B, n, D), (B, n, n) -> z (B, n, D)."""
        return e + self.out(relation.to(e.dtype) @ self.g(e))
