"""DRKD (method.md): the Distiller on both detectors, GloRe, batched instance relations, the
relation filter, the anchored matrix target, hook hygiene, export, switches and golden values."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
import torch
from torch import nn
from torchvision.ops import roi_align

from conftest import (
    DRKD_EMBED,
    DRKD_HIDDEN,
    LEVEL_SIZES,
    SMALL_PIXEL,
    assert_kd_reaches_student_features_only,
    box_targets,
    drkd_config,
    fpn_maps,
    toy_distiller,
    toy_model,
)
from drkd.config import (
    DistillConfig,
    UserError,
    from_dict,
    merge,
    parse_params,
    read_yaml_file,
    row_distill,
)
from drkd.distiller import Distiller
from drkd.losses import distance, instance_relation_loss, relation_filter_loss
from drkd.models import build_detector, count_parameters
from drkd.modules.glore import GloRe
from drkd.modules.relation import (
    FILTER_MIN,
    InstanceRelation,
    RelationFilter,
    pad_instances,
    pair_mask,
    relation_matrix,
)
from drkd.taps import capture

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4  # background + 3
DRKD_LISTS = ("glore_s", "glore_t", "pixel_adapters", "instance_adapters", "relation_s",
              "relation_t", "filters")
Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]


def batch(counts: tuple[int, ...] = (0, 1, 4)) -> Batch:
    """64 px images with ``counts[i]`` boxes each (all larger than 8 px)."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for n in counts:
        images.append(torch.rand(3, 64, 64, generator=g))
        xy = torch.rand(n, 2, generator=g) * 36
        wh = 8 + torch.rand(n, 2, generator=g) * 20
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(1, NUM_CLASSES, (n,), generator=g)})
    return images, targets


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: nn.Module) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))


def identity_adapters(d: Distiller) -> None:
    with torch.no_grad():
        for adapter in [*d.method.pixel_adapters, *d.method.instance_adapters]:
            weight, bias = cast(torch.Tensor, adapter.weight), cast(torch.Tensor, adapter.bias)
            assert weight.shape[0] == weight.shape[1]
            weight.copy_(torch.eye(weight.shape[0]).view(weight.shape))
            bias.zero_()


# -- (1) both detectors: shapes, finite losses, backward -------------------------------------


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_forward_on_both_detectors(arch: str) -> None:
    d = toy_distiller(drkd_config(), arch)
    assert len(d.method.glore_s) == len(d.method.glore_t) == len(d.method.pixel_adapters) == 5
    assert len(d.method.instance_adapters) == len(d.method.relation_s) == len(d.method.filters) == 2
    for adapter in [*d.method.pixel_adapters, *d.method.instance_adapters]:
        assert cast(torch.Tensor, adapter.weight).shape[:2] == (24, 16)
    d.train()
    losses = d(*batch((0, 1, 4)))
    assert {"loss_pr", "loss_ir", "loss_ins"} <= set(losses)
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), (name, value)
    assert losses["loss_pr"] > 0 and losses["loss_ins"] > 0
    assert losses["loss_ir"] > 0  # the image with 4 boxes has relations
    sum(losses.values()).backward()
    missing = [n for n, p in d.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # every trainable weight is reached, student and DRKD modules alike
    assert all(torch.isfinite(p.grad).all() for p in trainable(d) if p.grad is not None)

    # GloRe keeps (B, C, H, W) on every level, on both sides.
    with torch.no_grad():
        sizes = LEVEL_SIZES[arch]
        s_maps = list(d.student.backbone(torch.rand(2, 3, 64, 64)).values())
        t_maps = list(d.teacher.backbone(torch.rand(2, 3, 64, 64)).values())
        assert [m.shape[-1] for m in s_maps] == list(sizes)
        for g_s, g_t, s, t in zip(d.method.glore_s, d.method.glore_t, s_maps, t_maps, strict=True):
            assert g_s(s).shape == s.shape == (2, 16, *s.shape[-2:])
            assert g_t(t).shape == t.shape == (2, 24, *t.shape[-2:])


def test_glore_identity_at_init_and_shape() -> None:
    glore = GloRe(8, 4, 6)
    x = torch.randn(3, 8, 5, 7)
    for mode in (True, False):
        glore.train(mode)
        assert torch.equal(glore(x), x)
    with torch.no_grad():
        glore.norm.weight.fill_(1.0)
    y = glore.train()(x)
    assert y.shape == x.shape and (y - x).abs().max() > 1e-3  # not the identity once trained


@pytest.mark.parametrize("training", [False, True])
def test_glore_equals_the_papers_convolution_form(training: bool) -> None:
    """method.md steps 1-4 written with 1x1 convolutions, on the unit's own weights, and
    torch's BatchNorm on their output: forward, gradients and (training) running statistics."""
    torch.manual_seed(0)
    glore = GloRe(8, 4, 6).train(training)
    with torch.no_grad():
        glore.norm.weight.fill_(1.5)
        glore.norm.bias.uniform_()
        glore.norm.running_mean.uniform_()
    norm = copy.deepcopy(glore.norm)  # the reference BatchNorm, same state
    x = (torch.randn(3, 8, 5, 7) * 2 + 3).requires_grad_()  # off-centre: a mean to remove
    conv1x1 = lambda t, w, b=None: torch.nn.functional.conv1d(t, w[:, :, None], b)  # noqa: E731
    w_s, w_b = glore.project.weight.split([6, 4]), glore.project.bias.split([6, 4])
    states = conv1x1(x.flatten(2), w_s[0], w_b[0])  # X_s: (B, S, HW)
    proj = conv1x1(x.flatten(2), w_s[1], w_b[1])  # B: (B, N, HW)
    v = states @ proj.transpose(1, 2) / 35  # (B, S, N)
    a_v = conv1x1(v.transpose(1, 2), glore.node_mix.weight, glore.node_mix.bias).transpose(1, 2)
    z = conv1x1(torch.relu(v + a_v), glore.state_mix.weight)
    y = conv1x1(z @ proj, glore.back.weight).view(3, 8, 5, 7)
    expected = x + norm(y.flatten(2)).view_as(x)
    out = glore(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    unit = [x, glore.project.weight, glore.project.bias, glore.node_mix.weight,
            glore.node_mix.bias, glore.state_mix.weight, glore.back.weight]
    probe = torch.randn_like(out)  # any upstream gradient
    got = torch.autograd.grad((out * probe).sum(), [*unit, glore.norm.weight, glore.norm.bias])
    want = torch.autograd.grad((expected * probe).sum(), [*unit, norm.weight, norm.bias])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    for name, buffer in norm.named_buffers():
        torch.testing.assert_close(dict(glore.norm.named_buffers())[name], buffer, msg=name)


# -- (2) images with 0 or 1 instance ---------------------------------------------------------


@pytest.mark.parametrize("target", ["features", "matrix", "both"])
def test_zero_or_one_instance_is_exactly_zero(target: str) -> None:
    d = toy_distiller(drkd_config(target))
    d.train()
    # Small: the terms are unweighted here, and a diverged student would hide a NaN source.
    optimizer = torch.optim.SGD(trainable(d), lr=1e-5)
    for reduction in ("norm", "mse"):
        d.method.cfg = replace(d.method.cfg, reduction=reduction)
        for counts in ((0, 1, 1), (0, 0, 0)):
            losses = d(*batch(counts))
            assert losses["loss_ir"].item() == 0.0, (reduction, counts)
            assert all(torch.isfinite(v) for v in losses.values())
            if counts == (0, 0, 0):
                assert losses["loss_ins"].item() == 0.0
            else:
                assert losses["loss_ins"] > 0
            optimizer.zero_grad()
            sum(losses.values()).backward()
            grads = [p.grad for p in trainable(d) if p.grad is not None]
            assert all(torch.isfinite(g).all() for g in grads), (reduction, counts)
            before = snapshot(d.student)
            optimizer.step()
            assert changed(before, d.student), (reduction, counts)  # the batch still trains


# -- (3) identical features give zero loss ---------------------------------------------------


@pytest.mark.parametrize("reduction", ["norm", "mse"])
@pytest.mark.parametrize("train", [False, True])  # eval: BN running stats; train: batch stats
def test_identical_features_give_zero_loss(reduction: str, train: bool) -> None:
    d = toy_distiller(drkd_config("both", reduction), c_s=16, c_t=16)
    identity_adapters(d)
    d.train(train)
    maps = fpn_maps(16, LEVEL_SIZES["retinanet"])
    targets = box_targets([[2, 3, 30, 40], [10, 10, 20, 22], [30, 5, 55, 60]],
                          [[0, 0, 16, 16], [20, 24, 60, 50]])
    for target in ("features", "matrix"):
        d.method.cfg = replace(d.method.cfg, instance=replace(d.method.cfg.instance, target=target))
        losses = d.method(maps, [m.clone() for m in maps], targets, (64, 64))
        assert abs(losses["loss_pr"].item()) < 1e-6
        assert abs(losses["loss_ins"].item()) < 1e-6
        if target == "features":  # W of z = e + W(R g(e)) starts at 0: z = e on both sides
            assert abs(losses["loss_ir"].item()) < 1e-6
        else:  # the two sides embed differently until their theta/phi agree
            assert losses["loss_ir"].item() > 1e-6
    with torch.no_grad():
        for s, t in zip(d.method.relation_s, d.method.relation_t, strict=True):
            s.theta.load_state_dict(t.theta.state_dict())
            s.phi.load_state_dict(t.phi.state_dict())
    losses = d.method(maps, [m.clone() for m in maps], targets, (64, 64))
    assert abs(losses["loss_ir"].item()) < 1e-6


# -- (4) gradients: student and DRKD modules, never the teacher ------------------------------


def test_gradients_reach_student_and_modules_never_teacher() -> None:
    d = toy_distiller(drkd_config("both"))
    d.train()
    assert d.student.training and not d.teacher.training
    assert not any(m.training for m in d.teacher.modules())
    teacher_ids = {id(p) for p in d.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in trainable(d)}
    losses = d(*batch((0, 2, 4)))
    for term in ("loss_pr", "loss_ir", "loss_ins"):
        assert_kd_reaches_student_features_only(d, losses[term])
    sum(losses.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())
    assert all(p.grad is not None for p in d.student.backbone.parameters())
    for name in ("glore_s", "glore_t", "pixel_adapters", "instance_adapters", "relation_s",
                 "filters"):
        params = list(getattr(d.method, name).parameters())
        assert params and all(p.grad is not None for p in params), name
    for block in d.method.relation_t:
        for p in [*block.theta.parameters(), *block.phi.parameters()]:
            assert not p.requires_grad and p.grad is None
        assert all(p.grad is not None for p in [*block.g.parameters(), *block.out.parameters()])
    # Every trainable parameter gets a gradient (DDP without find_unused_parameters).
    missing = [n for n, p in d.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert not d.teacher.training


# -- (5) batched relations equal a per-image reference ---------------------------------------


COUNTS = (3, 0, 1, 5)
IMAGE_INDEX = torch.tensor([3, 0, 3, 3, 0, 2, 0, 3, 3])  # interleaved: counts (3, 0, 1, 5)


def standardise(e: torch.Tensor) -> torch.Tensor:
    """Each row (n, D) to zero mean and unit (biased) variance, with layer norm's eps 1e-5."""
    mean = e.mean(dim=1, keepdim=True)
    var = ((e - mean) ** 2).mean(dim=1, keepdim=True)
    return (e - mean) / torch.sqrt(var + 1e-5)


def reference_relation(block: InstanceRelation, filt: RelationFilter | None, e: torch.Tensor,
                       tau: float, topk: int, self_pairs: bool = True) -> torch.Tensor:
    """One image's R, written out plainly; e: (n, D) -> (n, n). The filter's weight is
    0.5 + sigmoid(query . key / sqrt(h)) of the standardised features; without ``self_pairs``
    the diagonal is no pair and a row without any pair is 0."""
    n = len(e)
    logits = block.theta(e) @ block.phi(e).T / math.sqrt(DRKD_EMBED)
    strength = torch.exp(logits / tau)  # a relation's softmax numerator
    if filt is not None:
        x = standardise(e)
        scores = filt.query(x) @ filt.key(x).T / math.sqrt(DRKD_HIDDEN)
        strength = strength * (0.5 + torch.sigmoid(scores))
    keep = torch.ones(n, n, dtype=torch.bool)
    if not self_pairs:
        keep &= ~torch.eye(n, dtype=torch.bool)
    candidates = strength.masked_fill(~keep, 0.0)
    if topk and n > topk:
        keep &= candidates >= candidates.topk(topk, dim=-1).values[:, -1:]
    kept = strength.masked_fill(~keep, 0.0)
    return torch.nan_to_num(kept / kept.sum(-1, keepdim=True), nan=0.0)  # a row without a pair


def instance_features(seed: int = 0, dim: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(IMAGE_INDEX), dim, generator=g)


def test_pad_instances_keeps_order_and_masks() -> None:
    feats = instance_features()
    padded, mask = pad_instances(feats, IMAGE_INDEX, 4)
    assert padded.shape == (4, 5, 12) and mask.sum(1).tolist() == list(COUNTS)
    for i, n in enumerate(COUNTS):
        assert torch.equal(padded[i, :n], feats[IMAGE_INDEX == i])
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert torch.equal(padded[i, n:], torch.zeros_like(padded[i, n:]))
    empty, empty_mask = pad_instances(torch.zeros(0, 12), torch.zeros(0, dtype=torch.long), 3)
    assert empty.shape == (3, 0, 12) and empty_mask.shape == (3, 0)


@pytest.mark.parametrize("topk", [0, 2])
@pytest.mark.parametrize("use_filter", [True, False])
@pytest.mark.parametrize("self_pairs", [True, False])
def test_batched_relations_equal_per_image_reference(topk: int, use_filter: bool,
                                                     self_pairs: bool) -> None:
    dim = 12
    block, filt = InstanceRelation(dim, DRKD_EMBED), RelationFilter(dim, DRKD_HIDDEN)
    with torch.no_grad():
        nn.init.normal_(block.out.weight)  # W starts at 0; make refine non-trivial
    feats = instance_features(dim=dim)
    e, mask = pad_instances(feats, IMAGE_INDEX, 4)
    weights = filt(e, mask) if use_filter else None
    r = relation_matrix(block.affinity(e), mask, 0.5, topk, weights, self_pairs)
    z = block.refine(e, r)
    for i, n in enumerate(COUNTS):
        e_i = feats[IMAGE_INDEX == i]
        ref = reference_relation(block, filt if use_filter else None, e_i, 0.5, topk, self_pairs)
        torch.testing.assert_close(r[i, :n, :n], ref, atol=1e-5, rtol=0)
        assert r[i, n:].abs().sum() == 0 and r[i, :, n:].abs().sum() == 0
        partners = n if self_pairs else n - 1
        if partners:
            torch.testing.assert_close(r[i, :n, :n].sum(-1), torch.ones(n))
            if topk and partners > topk:
                assert ((r[i, :n, :n] > 0).sum(-1) == topk).all()
        if not self_pairs:
            assert r[i].diagonal().abs().sum() == 0
        if n:
            z_ref = e_i + block.out(ref @ block.g(e_i))
            torch.testing.assert_close(z[i, :n], z_ref, atol=1e-5, rtol=1e-5)


def test_filter_weights_raise_a_relation_whatever_its_logit_sign() -> None:
    """The filter's weight multiplies a relation's share (w exp(a / tau)), so a higher weight
    raises R_ij for a negative cosine as for a positive one, and weights equal along a row leave
    R as it is."""
    logits = torch.tensor([[[0.0, -0.5, -0.2], [-0.5, 0.0, 0.3], [-0.2, 0.3, 0.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    plain = relation_matrix(logits, mask, 0.1, self_pairs=False)
    valid = pair_mask(mask, self_pairs=False)
    uniform = relation_matrix(logits, mask, 0.1, weights=torch.where(valid, 0.7, 0.0),
                              self_pairs=False)
    torch.testing.assert_close(uniform, plain)
    favour = torch.where(valid, 0.5, 0.0)
    favour[0, 0, 1] = favour[0, 1, 2] = 1.5  # a negative (-0.5) and a positive (0.3) logit
    r = relation_matrix(logits, mask, 0.1, weights=favour, self_pairs=False)
    assert r[0, 0, 1] > plain[0, 0, 1] and r[0, 1, 2] > plain[0, 1, 2]
    # Row 0: w exp(a / tau) normalised over its two partners.
    shares = torch.tensor([1.5 * math.exp(-5.0), 0.5 * math.exp(-2.0)])
    torch.testing.assert_close(r[0, 0, 1:], shares / shares.sum())


def test_both_sides_relate_over_the_teachers_top_k() -> None:
    """With top-k, R_s spreads over the teacher's k strongest partners, not its own: a partner
    the teacher keeps and the student does not must still pull the student (a gradient)."""
    d = toy_distiller(drkd_config(target="matrix", instance={"similarity": "cosine", "tau": 0.1,
                                                        "topk": 2, "filter": False}))
    dim = 24 * 9  # the teacher's width times RoIAlign's 3x3

    def at_angles(degrees: list[float]) -> torch.Tensor:
        e = torch.zeros(1, len(degrees), dim)
        rad = torch.tensor(degrees) * math.pi / 180
        e[0, :, 0], e[0, :, 1] = torch.cos(rad), torch.sin(rad)
        return e

    # Instance 0's partners, nearest first: the teacher's 3, 2, 1; the student's 1, 2, 3.
    e_t = at_angles([0, 80, 40, 10])
    e_s = at_angles([0, 10, 40, 80]).requires_grad_()
    mask = torch.ones(1, 4, dtype=torch.bool)
    r_s, r_t, _ = d.method.matrices(0, e_s, e_t, mask)
    assert torch.equal(r_s > 0, r_t > 0)
    assert (r_t[0, 0] > 0).tolist() == [False, False, True, True]
    r_s[0, 0, 3].backward()
    assert e_s.grad is not None and e_s.grad[0, 3].abs().sum() > 0


@pytest.mark.parametrize("matrix, self_pairs", [(True, True), (True, False), (False, True)])
def test_relation_loss_batched_equals_per_image(matrix: bool, self_pairs: bool) -> None:
    g = torch.Generator().manual_seed(1)
    feats_s, feats_t = torch.randn(9, 12, generator=g), torch.randn(9, 12, generator=g)
    e_s, mask = pad_instances(feats_s, IMAGE_INDEX, 4)
    e_t, _ = pad_instances(feats_t, IMAGE_INDEX, 4)
    block = InstanceRelation(12, DRKD_EMBED)
    with torch.no_grad():
        if matrix:
            s = relation_matrix(block.affinity(e_s), mask, 1.0, self_pairs=self_pairs)
            t = relation_matrix(block.affinity(e_t), mask, 1.0, self_pairs=self_pairs)
        else:
            s, t = e_s, e_t
        # Garbage in padded slots (and, without self-pairs, on the diagonal) must not count.
        s = s + ~(pair_mask(mask, self_pairs) if matrix else mask[:, :, None]) * 7.0
        squared, count = 0.0, 0
        for i, n in enumerate(COUNTS):
            # No relations in an image with 0 or 1 instance; without self-pairs, an image of 2
            # has rows of one partner (1 on both sides), which do not count either.
            if n < (2 if self_pairs or not matrix else 3):
                continue
            if matrix:
                keep = torch.ones(n, n, dtype=torch.bool)
                if not self_pairs:
                    keep &= ~torch.eye(n, dtype=torch.bool)
                s_i, t_i = s[i, :n, :n][keep], t[i, :n, :n][keep]
            else:
                s_i, t_i = s[i, :n], t[i, :n]
            squared += float(((s_i - t_i) ** 2).sum())
            count += s_i.numel()
        norm = instance_relation_loss(s, t, mask, "norm", matrix, self_pairs)
        mse = instance_relation_loss(s, t, mask, "mse", matrix, self_pairs)
    # The release: one torch.dist over the whole batch, not one per image.
    assert norm.item() == pytest.approx(math.sqrt(squared), rel=1e-5)
    assert mse.item() == pytest.approx(squared / count, rel=1e-5)


# -- (6) the relation filter -----------------------------------------------------------------


def test_filter_weights_bounded_zero_on_invalid() -> None:
    filt = RelationFilter(12, DRKD_HIDDEN)
    e, mask = pad_instances(instance_features(), IMAGE_INDEX, 4)
    w = filt(e, mask)
    assert w.shape == (4, 5, 5) and torch.isfinite(w).all()
    for i, n in enumerate(COUNTS):
        assert ((w[i, :n, :n] > FILTER_MIN) & (w[i, :n, :n] < FILTER_MIN + 1)).all()
        assert w[i, n:].abs().sum() == 0 and w[i, :, n:].abs().sum() == 0
    with torch.no_grad():  # a zero score is a neutral weight of 1
        filt.query.weight.zero_()
        filt.query.bias.zero_()
    assert torch.equal(filt(e, mask), pair_mask(mask).float())
    one = filt(torch.randn(2, 1, 12), torch.tensor([[False], [True]]))
    assert one.tolist() == [[[0.0]], [[1.0]]]
    assert filt(torch.zeros(3, 0, 12), torch.zeros(3, 0, dtype=torch.bool)).shape == (3, 0, 0)


def test_filter_changes_relations() -> None:
    block, filt = InstanceRelation(12, DRKD_EMBED), RelationFilter(12, DRKD_HIDDEN)
    e, mask = pad_instances(instance_features(), IMAGE_INDEX, 4)
    logits = block.affinity(e)
    with_filter = relation_matrix(logits, mask, 1.0, 0, filt(e, mask))
    without = relation_matrix(logits, mask, 1.0)
    for i, n in enumerate(COUNTS):
        if n >= 3:
            assert (with_filter[i] - without[i]).abs().max() > 1e-3, i


def test_filter_loss_equals_its_formula() -> None:
    """Binary cross-entropy of the scores against "same class", over the pairs of distinct
    instances of each image, written out with logs (log sigma(x), log(1 - sigma(x)))."""
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([1, 2, 1, 3, 1, 2, 2, 1, 3])
    scores_all = torch.randn(4, 5, 5, generator=g)
    padded, mask = pad_instances(labels[:, None].float(), IMAGE_INDEX, 4)
    total, count = 0.0, 0
    for i, n in enumerate(COUNTS):
        lab = labels[IMAGE_INDEX == i]
        for a in range(n):
            for b in range(n):
                if a != b:
                    x = float(scores_all[i, a, b])
                    p = 1 / (1 + math.exp(-x))
                    total -= math.log(p) if lab[a] == lab[b] else math.log(1 - p)
                    count += 1
    loss = relation_filter_loss(scores_all, padded[..., 0].long(), mask)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    empty = relation_filter_loss(torch.zeros(2, 1, 1), torch.ones(2, 1, dtype=torch.long),
                                 torch.ones(2, 1, dtype=torch.bool))
    assert empty.item() == 0.0


def test_filter_does_not_start_saturated_on_large_features() -> None:
    """A teacher's raw instance features have norms in the tens; the filter's loss at
    initialisation stays near log 2 (unsaturated scores) whatever their scale."""
    torch.manual_seed(0)
    filt = RelationFilter(12, DRKD_HIDDEN)
    labels = torch.tensor([1, 2, 1, 3, 1, 2, 2, 1, 3])
    padded, mask = pad_instances(labels[:, None].float(), IMAGE_INDEX, 4)
    for scale in (1.0, 30.0, 300.0):
        e, _ = pad_instances(instance_features() * scale + scale, IMAGE_INDEX, 4)
        loss = relation_filter_loss(filt.scores(e), padded[..., 0].long(), mask)
        assert 0.3 < loss.item() < 1.5, scale


@pytest.mark.parametrize("target", ["matrix", "features"])
def test_filter_is_trained_by_its_own_loss_never_by_the_relation_loss(target: str) -> None:
    """The filter is saved with the modules; L_IR gives it no gradient (its weights are a
    constant to L_IR), loss_filter gives it one and reaches nothing else; a few steps of it
    separate same-class pairs from the others."""
    d = toy_distiller(drkd_config(target))
    keys = [k for k in d.state_dict() if k.startswith("method.filters.")]
    assert {k.split(".", 3)[3] for k in keys} == {"query.weight", "query.bias", "key.weight",
                                                   "key.bias"}
    assert len(keys) == 4 * len(d.method.filters) == 8
    s_maps, t_maps = fpn_maps(16, LEVEL_SIZES["retinanet"]), fpn_maps(24, (8, 4, 2, 1, 1), seed=1)
    targets = box_targets([[2, 3, 30, 40], [10, 10, 20, 22], [30, 5, 55, 60], [0, 0, 9, 9]],
                          [[0, 0, 16, 16], [20, 24, 60, 50], [5, 30, 40, 62]])
    targets[0]["labels"] = torch.tensor([1, 2, 1, 2])
    targets[1]["labels"] = torch.tensor([3, 3, 1])
    d.train()
    filters = list(d.method.filters.parameters())
    losses = d.method(s_maps, t_maps, targets, (64, 64))
    grads = torch.autograd.grad(losses["loss_ir"], filters, allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    assert losses["loss_filter"].item() > 0.1
    grads = torch.autograd.grad(losses["loss_filter"], filters)
    assert all(g.abs().sum() > 0 for g in grads)
    others = [p for n, p in d.named_parameters() if p.requires_grad and ".filters." not in n]
    grads = torch.autograd.grad(losses["loss_filter"], others, allow_unused=True)
    assert all(g is None for g in grads)  # the teacher's features are detached

    optimizer = torch.optim.Adam(filters, lr=1e-2)
    first = losses["loss_filter"].item()
    for _ in range(30):
        loss = d.method(s_maps, t_maps, targets, (64, 64))["loss_filter"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


# -- (7) no trivial solution: the relation terms cannot collapse ------------------------------


def relation_configs() -> list[tuple[str, DistillConfig]]:
    """The DRKD relation settings (w_ir > 0) that users run, each once: params.yaml's
    `distill`, its compare rows and every preset's, as the strict loader resolves them."""
    base = read_yaml_file(ROOT / "params.yaml")
    found, seen = [], set()
    for source in [None, *sorted((ROOT / "presets").glob("*.yaml"))]:
        merged = base if source is None else merge(base, read_yaml_file(source))
        params = parse_params(merged)
        name = "params.yaml" if source is None else source.name
        rows = {"": merged["distill"]} | {
            f":{row}": row_distill(merged["distill"], row, overrides)
            for row, overrides in merged["compare"]["methods"].items()}
        for row, distill in rows.items():
            cfg = from_dict(DistillConfig, distill, "distill") if row else params.distill
            relation = (cfg.instance, cfg.release, cfg.reduction)  # what the test exercises
            if cfg.method == "drkd" and cfg.w_ir > 0 and relation not in seen:
                seen.add(relation)
                found.append((name + row, cfg))
    assert found[0][0] == "params.yaml"  # the default relates instances
    return found


def unrelated_instances(seed: int, dim: int) -> torch.Tensor:
    """(4 images, 6 instances, dim) features with within-image cosines ~0.5: a shared
    per-image direction plus independent noise of the same norm."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(4, 1, dim, generator=g)
    return shared + torch.randn(4, 6, dim, generator=g)


def fit_relation_modules(d: Distiller, steps: int, labels: torch.Tensor,
                         only_filters: bool = False) -> tuple[list[float], torch.Tensor | None]:
    """Adam (lr 3e-3) on every trainable DRKD parameter that is not the student's (the
    filters and the teacher side; ``only_filters``: the filters alone) to minimise one
    level's L_IR plus loss_filter, as training does, between fixed, unrelated student and
    teacher instance features: a student that cannot follow, so only the relation modules
    could bring L_IR down. Returns the L_IR history and the filter's weights at the end."""
    frozen = ("student.", "teacher.", "method.relation_s.", "method.instance_adapters.")
    params = [p for n, p in d.named_parameters() if p.requires_grad
              and not n.startswith(frozen) and (not only_filters or ".filters." in n)]
    assert params
    optimizer = torch.optim.Adam(params, lr=3e-3)
    e_t, e_s = unrelated_instances(1, 24 * 9), unrelated_instances(2, 24 * 9)  # C = 24
    mask = torch.ones(4, 6, dtype=torch.bool)
    history = []
    for _ in range(steps):
        loss, scores = d.method.relation_loss(0, e_s, e_t, mask)
        total = loss if scores is None else loss + relation_filter_loss(scores, labels, mask)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(loss.item())
    with torch.no_grad():
        weights = d.method.filters[0](e_t, mask) if len(d.method.filters) else None
    return history, weights


CONFIGS = relation_configs()


@pytest.mark.parametrize("name, cfg", CONFIGS, ids=[n for n, _ in CONFIGS])
@pytest.mark.parametrize("labels", ["mixed", "all-different"])
def test_relation_loss_has_no_trivial_solution(name: str, cfg: DistillConfig,
                                               labels: str) -> None:
    """method.md, "Beware trivial solutions", in every relation setting users run: with a
    student that cannot follow, 300 steps of the relation modules leave L_IR above half its
    start, no filter row gives one partner (nearly) all of its weight, and an instance is not
    its own partner (the release's block keeps self-pairs). Pair labels either mixed or all
    different (the filter then lowers every weight: it still cannot flatten the rows)."""
    cfg = replace(cfg, w_pr=0.0, w_ins=0.0)  # the relation path alone
    d = toy_distiller(cfg, c_s=24, c_t=24)
    d.method.relation_s.requires_grad_(False)
    if labels == "mixed":
        pair_labels = torch.tensor([[1, 1, 2, 2, 3, 1]] * 4)
    else:
        pair_labels = torch.arange(1, 7).repeat(4, 1)
    # The release trains its teacher-side embeddings (its target drifts, as
    # test_anchored_target_cannot_collapse_but_a_drifting_one_does shows): there only the filter.
    if cfg.release and not cfg.instance.filter:
        pytest.skip("release settings without a filter: only the release's drifting target")
    history, weights = fit_relation_modules(d, 300, pair_labels, only_filters=cfg.release)
    assert history[0] > 0 and min(history) > 0.5 * history[0], (history[0], min(history))
    if weights is not None:
        partners = pair_mask(torch.ones(4, 6, dtype=torch.bool), self_pairs=False)
        rows = torch.where(partners, weights, 0.0)
        top_share = rows.max(-1).values / rows.sum(-1)
        assert top_share.max() < 0.5, top_share.max()  # uniform: 0.2; one-hot: 1
    if not cfg.release:
        e_t = unrelated_instances(1, 24 * 9)
        _, r_t, _ = d.method.matrices(0, e_t, e_t, torch.ones(4, 6, dtype=torch.bool))
        assert r_t.diagonal(dim1=1, dim2=2).abs().max() == 0


def test_anchored_target_cannot_collapse_but_a_drifting_one_does() -> None:
    """The learned similarity: the teacher's theta/phi stay as initialised, so L_IR stays up;
    control: with them trainable the target follows the student and L_IR vanishes, so the
    check above can fail."""
    labels = torch.tensor([[1, 1, 2, 2, 3, 1]] * 4)
    d = toy_distiller(drkd_config("matrix"), c_s=24, c_t=24)
    d.method.relation_s.requires_grad_(False)
    frozen = snapshot(d.method.relation_t)
    history, _ = fit_relation_modules(d, 150, labels)
    assert not changed(frozen, d.method.relation_t)
    assert min(history) > 0.5 * history[0], (history[0], min(history))
    control = toy_distiller(drkd_config("matrix"), c_s=24, c_t=24)
    control.method.relation_s.requires_grad_(False)
    control.method.relation_t.requires_grad_(True)
    unanchored, _ = fit_relation_modules(control, 150, labels)
    assert min(unanchored) < 1e-3 * unanchored[0], (unanchored[0], min(unanchored))


# -- (8) hooks are removed even when the forward raises --------------------------------------


def no_hooks(detector: nn.Module) -> bool:
    return not (detector.transform._forward_hooks or detector.backbone._forward_hooks)


def test_hooks_removed_after_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    detector = build_detector(toy_model(), NUM_CLASSES)
    with pytest.raises(RuntimeError, match="inside"), capture(detector):
        assert not no_hooks(detector)
        raise RuntimeError("inside")
    assert no_hooks(detector)

    d = toy_distiller(drkd_config())
    d.train()
    images, targets = batch((1, 2))
    bad = [dict(t, labels=t["labels"].float()) for t in targets]  # labels must be int64
    with pytest.raises((IndexError, RuntimeError)):
        d(images, bad)
    assert no_hooks(d.student) and no_hooks(d.teacher)

    def boom(*_: object) -> None:
        raise RuntimeError("head exploded")

    monkeypatch.setattr(d.student.head, "forward", boom)  # after the hooked transform/backbone
    with pytest.raises(RuntimeError, match="head exploded"):
        d(images, targets)
    assert no_hooks(d.student) and no_hooks(d.teacher)
    monkeypatch.undo()
    assert set(d(images, targets)) >= {"loss_pr", "loss_ir", "loss_ins"}  # still usable
    assert no_hooks(d.student)


# -- (9) an incompatible teacher is refused --------------------------------------------------


def test_incompatible_teacher_refused() -> None:
    student = build_detector(toy_model(), NUM_CLASSES)
    for overrides, word in (({"min_size": 48}, "min_size"), ({"max_size": 96}, "max_size")):
        teacher = build_detector(toy_model(**overrides), NUM_CLASSES)
        with pytest.raises(ValueError, match=word):
            Distiller(student, teacher, drkd_config())
    teacher = build_detector(toy_model(), NUM_CLASSES)
    teacher.transform.image_mean = [0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="image_mean"):
        Distiller(student, teacher, drkd_config())
    teacher = build_detector(toy_model("faster_rcnn"), NUM_CLASSES)
    with pytest.raises(ValueError, match="pyramids differ"):
        Distiller(student, teacher, drkd_config())


def test_init_student_starts_neck_and_head_from_the_teacher_and_keeps_the_body() -> None:
    # R34 -> R18: the bodies differ, their stages' widths (hence the FPN's inputs) agree.
    torch.manual_seed(0)
    teacher = build_detector(toy_model(backbone="resnet34"), NUM_CLASSES)
    torch.manual_seed(1)
    student = build_detector(toy_model(), NUM_CLASSES)
    own = {k: v.clone() for k, v in student.state_dict().items()}
    Distiller(student, teacher, drkd_config(method="mgd", init_student=True))
    t_state, s_state = teacher.state_dict(), student.state_dict()
    body = [k for k in s_state if k.startswith("backbone.body.")]
    rest = [k for k in s_state if not k.startswith("backbone.body.")]
    assert body and any(k.startswith("backbone.fpn.") for k in rest)
    assert any(k.startswith("head.") for k in rest)
    assert all(torch.equal(s_state[k], t_state[k]) for k in rest)
    assert all(torch.equal(s_state[k], own[k]) for k in body)
    assert not all(torch.equal(own[k], t_state[k]) for k in rest)  # it did copy something


def test_init_student_refuses_another_neck_in_one_line() -> None:
    teacher = build_detector(toy_model(fpn_channels=24), NUM_CLASSES)
    student = build_detector(toy_model(), NUM_CLASSES)
    own = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(UserError, match=r"^distill.init_student: the teacher's backbone\.fpn\."
                       r"\S+ is \(24,.*the student's \(16,") as error:
        Distiller(student, teacher, drkd_config(method="mgd", init_student=True))
    assert "\n" not in str(error.value)
    assert all(torch.equal(v, own[k]) for k, v in student.state_dict().items())  # untouched


# -- (10) the exported student is a plain detector -------------------------------------------


def test_exported_student_is_plain_detector() -> None:
    d = toy_distiller(drkd_config())
    d.train()
    optimizer = torch.optim.SGD(trainable(d), lr=0.1)
    sum(d(*batch()).values()).backward()
    optimizer.step()
    fresh = build_detector(toy_model(), NUM_CLASSES)
    exported = d.student.state_dict()
    # Exactly a plain detector's keys and shapes: no DRKD module, no teacher, nothing missing.
    assert {k: v.shape for k, v in exported.items()} == {
        k: v.shape for k, v in fresh.state_dict().items()}
    fresh.load_state_dict(exported, strict=True)
    assert count_parameters(d.student) == count_parameters(fresh)
    assert count_parameters(d) > count_parameters(d.student) + count_parameters(d.teacher)


# -- (11) switching terms off ----------------------------------------------------------------


def built(d: Distiller) -> set[str]:
    if d.method is None:
        return set()
    return {name for name in DRKD_LISTS if len(getattr(d.method, name, ()))} | (
        {"mimic_adapters"} if hasattr(d.method, "adapters") and len(d.method.adapters) else set())


def distill_keys(d: Distiller) -> set[str]:
    targets = box_targets([[2, 3, 30, 40], [10, 10, 20, 22]], [])
    s_maps, t_maps = fpn_maps(16, (8, 4, 2, 1, 1)), fpn_maps(24, (8, 4, 2, 1, 1))
    return set(d.method(s_maps, t_maps, targets, (64, 64))) if d.method else set()


def test_switching_terms_off() -> None:
    d = toy_distiller(drkd_config(w_pr=0.0))
    assert built(d) == {"instance_adapters", "relation_s", "relation_t", "filters"}
    assert distill_keys(d) == {"loss_ir", "loss_ins", "loss_filter"}
    d = toy_distiller(drkd_config(w_ir=0.0))
    assert built(d) == {"glore_s", "glore_t", "pixel_adapters", "instance_adapters"}
    assert distill_keys(d) == {"loss_pr", "loss_ins"}
    d = toy_distiller(drkd_config(w_ir=0.0, w_ins=0.0))
    assert built(d) == {"glore_s", "glore_t", "pixel_adapters"}
    assert distill_keys(d) == {"loss_pr"}
    d = toy_distiller(drkd_config(instance={"filter": False}))
    assert "filters" not in built(d) and "relation_s" in built(d)
    assert "loss_filter" not in distill_keys(d)
    # The release's L_IR alone (presets/paper_retinanet.yaml) relates unadapted features: no
    # instance adapter, which would get no gradient (DDP without find_unused_parameters stops).
    d = toy_distiller(drkd_config(release=True, w_pr=0.0, w_ins=0.0, instance={"filter": False}))
    assert built(d) == {"relation_s", "relation_t"} and len(d.method.ir_adapters) == 2
    d.train()
    sum(d(*batch()).values()).backward()
    assert [n for n, p in d.method.named_parameters() if p.requires_grad and p.grad is None] == []
    d = toy_distiller(drkd_config(method="mimic"))
    assert built(d) == {"mimic_adapters"} and len(d.method.adapters) == 5
    assert distill_keys(d) == {"loss_mimic"}
    d = toy_distiller(drkd_config(method="none"))
    assert built(d) == set() and distill_keys(d) == set()
    d.train()
    images, targets = batch()
    assert set(d(images, targets)) == set(d.student(images, targets))


def test_cosine_similarity_stays_fp32_under_autocast() -> None:
    """Under bf16 autocast (a GPU's training) the cosines are the fp32 ones: in bf16 they move
    by ~4e-3 (0.04 in a logit at tau 0.1) and distinct ones tie, which changes top-k."""
    from drkd.modules.relation import cosine_similarity

    e = torch.randn(2, 6, 576, generator=torch.Generator().manual_seed(0))
    pairwise = nn.functional.cosine_similarity(e[:, :, None], e[:, None], dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cosine_similarity(e)
    assert got.dtype == torch.float32
    assert torch.allclose(got, pairwise, atol=1e-6)


def test_cosine_similarity_is_parameter_free_and_zero_on_identical_features() -> None:
    """similarity: cosine builds no theta/phi on either side; with identical features and
    identity adapters the two relation matrices agree from the first step (no embedding to
    align, unlike the learned affinity)."""
    d = toy_distiller(drkd_config("matrix", instance={"similarity": "cosine"}), c_s=16, c_t=16)
    assert not any(hasattr(b, "theta") or hasattr(b, "phi")
                   for b in [*d.method.relation_s, *d.method.relation_t])
    identity_adapters(d)
    maps = fpn_maps(16, LEVEL_SIZES["retinanet"])
    boxes = box_targets([[2, 3, 30, 40], [10, 10, 20, 22], [30, 5, 55, 60]],
                        [[0, 0, 16, 16], [20, 24, 60, 50]])
    losses = d.method(maps, [m.clone() for m in maps], boxes, (64, 64))
    assert abs(losses["loss_ir"].item()) < 1e-6
    losses = d.method(maps, fpn_maps(16, LEVEL_SIZES["retinanet"], seed=1), boxes, (64, 64))
    assert losses["loss_ir"].item() > 1e-4
    d.train()
    sum(d(*batch((0, 2, 4))).values()).backward()
    missing = [n for n, p in d.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_frozen_teacher_glore_keeps_its_weights() -> None:
    """pixel.freeze_teacher: the teacher's GloRe units get no gradient and do not move in
    training, while the student's do."""
    d = toy_distiller(drkd_config(w_ir=0.0, w_ins=0.0, release=True,
                                  pixel=replace(SMALL_PIXEL, freeze_teacher=True)))
    assert not trainable(d.method.glore_t) and trainable(d.method.glore_s)
    before_t, before_s = snapshot(d.method.glore_t), snapshot(d.method.glore_s)
    d.train()
    optimizer = torch.optim.SGD(trainable(d), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        sum(d(*batch((0, 2, 4))).values()).backward()
        optimizer.step()
    assert not changed(before_t, d.method.glore_t) and changed(before_s, d.method.glore_s)
    missing = [n for n, p in d.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_a_frozen_identity_teacher_glore_is_refused() -> None:
    """Frozen and started as the identity, the teacher's unit returns its map unchanged, so
    L_PR would have no relations in its target: refused, naming the setting; with a relational
    start (or the release's) it builds."""
    frozen = replace(SMALL_PIXEL, freeze_teacher=True)
    with pytest.raises(UserError, match=r"^distill\.pixel\.freeze_teacher: a frozen unit that "
                                         r"starts as the identity"):
        toy_distiller(drkd_config(w_ir=0.0, w_ins=0.0, pixel=frozen))
    d = toy_distiller(drkd_config(w_ir=0.0, w_ins=0.0,
                                  pixel=replace(frozen, identity_start=False)))
    unit = d.method.glore_t[0]
    x = torch.randn(2, unit.project.in_features, 4, 4)
    assert not trainable(unit) and not torch.allclose(unit.eval()(x), x)


def test_standardized_pixel_loss_equals_its_formula() -> None:
    """pixel.standardize: per level, MSE between the two sides' GloRe outputs, each channel
    standardised over the batch's pixels (mean 0, unbiased std 1), written out here."""
    cfg = drkd_config(w_ir=0.0, w_ins=0.0, pixel=replace(SMALL_PIXEL, standardize=True))
    d = toy_distiller(cfg, c_s=8, c_t=12)
    d.eval()
    sizes = (8, 4, 2, 1, 1)
    s_maps, t_maps = fpn_maps(8, sizes, 3, seed=2), fpn_maps(12, sizes, 3, seed=3)
    expected = 0.0
    for g_s, g_t, adapter, s, t in zip(d.method.glore_s, d.method.glore_t,
                                       d.method.pixel_adapters, s_maps, t_maps, strict=True):
        sides = [torch.cat([adapter(reference_glore(g_s, x)) for x in s]),
                 torch.cat([reference_glore(g_t, x) for x in t])]  # (B*HW, C_t)
        z = []
        for v in sides:
            n = v.shape[0]
            mean = v.sum(0) / n
            std = (((v - mean) ** 2).sum(0) / (n - 1)).sqrt()
            z.append((v - mean) / (std + 1e-6))
        expected += float(((z[0] - z[1]) ** 2).mean().detach())
    with torch.no_grad():
        loss = d.method(s_maps, t_maps, box_targets([], [], []), (32, 32))["loss_pr"].item()
    assert loss == pytest.approx(expected, rel=1e-4)
    assert 0.5 < expected / len(sizes) < 4  # standardised: O(1) per level, whatever the scale


def test_release_compares_raw_glore_outputs_even_with_standardize_on() -> None:
    """`release: true` implies pixel.standardize false (the release has no standardisation);
    without `release`, standardize changes L_PR."""
    maps_s, maps_t = fpn_maps(16, (8, 4), 2, seed=5), fpn_maps(16, (8, 4), 2, seed=6)

    def loss_pr(release: bool, standardize: bool) -> float:
        torch.manual_seed(0)
        pixel = replace(SMALL_PIXEL, standardize=standardize)
        cfg = drkd_config(w_ir=0.0, w_ins=0.0, release=release, pixel=pixel)
        d = toy_distiller(cfg, c_s=16, c_t=16)
        with torch.no_grad():
            return d.method(maps_s, maps_t, box_targets([], []), (64, 64))["loss_pr"].item()

    assert loss_pr(True, True) == loss_pr(True, False)
    assert loss_pr(False, True) != pytest.approx(loss_pr(False, False), rel=1e-3)


def test_glore_drift_is_zero_for_a_fresh_unit_and_its_formula_otherwise() -> None:
    """glore_drift (relations_plot): ||GloRe(F) - F|| / ||F|| per level; a fresh unit of ours
    is the identity (0), a release unit is not; checked against reference_glore."""
    from drkd.relations_plot import glore_drift

    maps = fpn_maps(12, (8, 4), 2, seed=4)
    fresh = [GloRe(12, 4, 8).eval() for _ in maps]
    assert glore_drift(fresh, maps) == [0.0, 0.0]
    relational = [GloRe(12, 4, 8, identity_start=False).eval() for _ in maps]
    assert min(glore_drift(relational, maps)) > 0  # BN weight 1: not the identity at the start
    release = [GloRe(12, 4, 8, release=True).eval() for _ in maps]
    with torch.no_grad():
        drift = glore_drift(release, maps)
        expected = []
        for unit, m in zip(release, maps, strict=True):
            out = torch.cat([reference_glore(unit, x, release=True) for x in m])
            pixels = torch.cat([x.flatten(1).T for x in m])
            expected.append(float((out - pixels).norm() / pixels.norm()))
    assert drift == pytest.approx(expected, rel=1e-5) and min(drift) > 0


def test_matrix_target_builds_no_unused_parameters() -> None:
    d = toy_distiller(drkd_config("matrix"), "faster_rcnn")
    for block in [*d.method.relation_s, *d.method.relation_t]:
        assert not hasattr(block, "g") and not hasattr(block, "out")
    d.train()
    sum(d(*batch((0, 2, 4))).values()).backward()
    missing = [n for n, p in d.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


# -- (12) golden values ----------------------------------------------------------------------


def test_distance_by_hand() -> None:
    a, zero = torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)
    assert distance(a, zero, "norm").item() == 5.0
    assert distance(a, zero, "mse").item() == 12.5
    two = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
    # One norm over the whole batch (the release's torch.dist), not a sum of per-image norms.
    assert distance(two, torch.zeros(2, 2), "norm").item() == pytest.approx(125**0.5)
    valid = torch.tensor([[True, False], [False, False]])
    assert distance(two, torch.zeros(2, 2), "norm", valid).item() == 3.0
    assert distance(two, torch.zeros(2, 2), "mse", valid).item() == 9.0  # over valid only
    assert distance(two, two, "mse", torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0


def reference_glore(g: GloRe, x: torch.Tensor, release: bool = False) -> torch.Tensor:
    """method.md steps 1-4 per image, from the unit's weights: (C, H, W) -> pixels (HW, C).
    Ours divides V by HW and uses BatchNorm eps 1e-5; the release neither divides nor uses
    that eps (1e-4)."""
    c, h, w = x.shape
    pixels = x.flatten(1).T  # (HW, C)
    states = pixels @ g.project.weight[: g.states].T + g.project.bias[: g.states]  # (HW, S)
    proj = pixels @ g.project.weight[g.states:].T + g.project.bias[g.states:]  # (HW, N)
    v = states.T @ proj / (1 if release else h * w)  # (S, N)
    v = torch.relu(v + v @ g.node_mix.weight.T + g.node_mix.bias)
    z = g.state_mix.weight @ v  # (S, N)
    y = (proj @ z.T) @ g.back.weight.T  # (HW, C)
    bn = g.norm
    eps = 1e-4 if release else 1e-5
    y = (y - bn.running_mean) / torch.sqrt(bn.running_var + eps) * bn.weight + bn.bias
    return pixels + y


def reference_distance(pairs: list[tuple[torch.Tensor, torch.Tensor]], reduction: str) -> float:
    """One level: the squared error over all (student, teacher) pieces, as MSE over their
    elements or as the release's single L2 norm."""
    squared = sum(float(((a - b) ** 2).sum()) for a, b in pairs)
    count = sum(a.numel() for a, _ in pairs)
    return math.sqrt(squared) if reduction == "norm" else squared / max(count, 1)


def formula_strength(e: torch.Tensor, block: InstanceRelation, weights: torch.Tensor | None,
                     tau: float, release: bool = False) -> torch.Tensor:
    """One image (n, D) -> each relation's softmax numerator w_ij exp(a_ij / tau) (n, n); a_ij
    scaled by 1/sqrt(d) (ours) or not (the release); ours has no self-pairs (0 on the diagonal),
    the release's non-local block does."""
    if hasattr(block, "theta"):
        a = (e @ block.theta.weight.T + block.theta.bias) @ (e @ block.phi.weight.T
                                                              + block.phi.bias).T
        a = a if release else a / math.sqrt(block.theta.out_features)
    else:  # similarity: cosine, pair by pair
        a = nn.functional.cosine_similarity(e[:, None, :], e[None, :, :], dim=-1)
    strength = torch.exp(a.double() / tau)
    if weights is not None:
        strength = strength * weights
    return strength if release else strength * (1 - torch.eye(len(e), dtype=torch.float64))


def formula_relation(strength: torch.Tensor, teacher_strength: torch.Tensor,
                     topk: int) -> torch.Tensor:
    """R (n, n): each row's strengths normalised over the teacher's k strongest partners of the
    row (top-k: both sides relate over the same partners), or over every partner."""
    if topk and strength.shape[1] > topk:
        kth = teacher_strength.sort(dim=1, descending=True).values[:, topk - 1: topk]
        strength = torch.where(teacher_strength >= kth, strength, 0.0)
    return (strength / strength.sum(1, keepdim=True)).float()


def formula_filter(e: torch.Tensor, filt: RelationFilter) -> torch.Tensor:
    """One image (n, D) -> weights (n, n): 0.5 + sigmoid(query.key / sqrt(h)) of the
    standardised features."""
    q, k = filt.query(standardise(e)), filt.key(standardise(e))
    return 0.5 + torch.sigmoid(q @ k.T / math.sqrt(q.shape[1]))


def formula_filter_bce(e: torch.Tensor, labels: torch.Tensor,
                       filt: RelationFilter) -> tuple[float, int]:
    """One image: the summed cross-entropy of the filter's same-class logits over the pairs of
    distinct instances, and the number of pairs."""
    q, k = filt.query(standardise(e)), filt.key(standardise(e))
    x = (q @ k.T / math.sqrt(q.shape[1])).double()
    total, count = 0.0, 0
    for i in range(len(e)):
        for j in range(len(e)):
            if i != j:  # -log sigma(x) = log(1 + e^-x); -log(1 - sigma(x)) = log(1 + e^x)
                sign = -1 if labels[i] == labels[j] else 1
                total += math.log1p(math.exp(sign * float(x[i, j])))
                count += 1
    return total, count


def formula_refine(e: torch.Tensor, r: torch.Tensor, block: InstanceRelation) -> torch.Tensor:
    """z = e + W(R g(e)) for one image."""
    return e + block.out(r @ block.g(e))


def reference_drkd(d: Distiller, s_maps: list[torch.Tensor], t_maps: list[torch.Tensor],
                   targets: list[dict[str, torch.Tensor]], size: int) -> dict[str, float]:
    """L_PR, L_INS, L_IR and the filter's loss written out per level and image (method.md),
    weights as trained. With ``release``, the authors' release: RoIAlign aligned=False with
    adaptive sampling, self-pairs kept, the student's relation block on its unadapted
    features and its own adapter after it."""
    m, cfg = d.method, d.cfg
    release = cfg.release
    sampling, aligned = (-1, False) if release else (2, True)
    pr = 0.0
    for g_s, g_t, adapter, s, t in zip(m.glore_s, m.glore_t, m.pixel_adapters, s_maps, t_maps,
                                       strict=True):
        pairs = [(adapter(reference_glore(g_s, s[i], release)),
                  reference_glore(g_t, t[i], release))
                 for i in range(len(s))]
        pr += reference_distance(pairs, cfg.reduction)
    ins, ir, filter_loss = 0.0, 0.0, 0.0
    for level in range(m.instance_levels):
        scale = s_maps[level].shape[-1] / size
        ins_pairs, ir_pairs = [], []
        bce, pairs_count = 0.0, 0
        for i, target in enumerate(targets):
            b = target["boxes"]
            if not len(b):
                continue
            conv = m.instance_adapters[level]
            adapted = nn.functional.conv2d(s_maps[level][i: i + 1], conv.weight, conv.bias)
            e_s = roi_align(adapted, [b], 3, scale, sampling, aligned).flatten(1)  # (n, C_t*9)
            e_t = roi_align(t_maps[level][i: i + 1], [b], 3, scale, sampling, aligned).flatten(1)
            raw_s = roi_align(s_maps[level][i: i + 1], [b], 3, scale, sampling,
                              aligned).flatten(1)  # (n, C_s*9)
            ins_pairs.append((e_s, e_t))
            if len(b) < 2:
                continue
            weights = formula_filter(e_t, m.filters[level]) if len(m.filters) else None
            if len(m.filters):
                total, count = formula_filter_bce(e_t, target["labels"], m.filters[level])
                bce, pairs_count = bce + total, pairs_count + count
            inst = cfg.instance
            rel_s = raw_s if release else e_s  # what the student's relation block sees
            s_s = formula_strength(rel_s, m.relation_s[level], weights, inst.tau, release)
            s_t = formula_strength(e_t, m.relation_t[level], weights, inst.tau, release)
            r_s = formula_relation(s_s, s_t, inst.topk)
            r_t = formula_relation(s_t, s_t, inst.topk)
            # Matrix rows count with >= 2 partners: ours (no self-pairs) needs 3 instances.
            if inst.target in ("matrix", "both") and (release or len(b) >= 3):
                off = torch.ones(len(b), len(b), dtype=torch.bool)
                off = off if release else off & ~torch.eye(len(b), dtype=torch.bool)
                ir_pairs.append(("matrix", r_s[off], r_t[off]))
            if inst.target in ("features", "both"):
                z_s = formula_refine(rel_s, r_s, m.relation_s[level])
                if release:
                    z_s = m.ir_adapters[level](z_s)
                ir_pairs.append(("features", z_s, formula_refine(e_t, r_t, m.relation_t[level])))
        ins += reference_distance(ins_pairs, cfg.reduction)
        filter_loss += bce / max(pairs_count, 1)
        for kind in ("matrix", "features"):
            chosen = [(a, b) for k, a, b in ir_pairs if k == kind]
            ir += reference_distance(chosen, cfg.reduction) if chosen else 0.0
    out = {"loss_pr": cfg.w_pr * pr, "loss_ir": cfg.w_ir * ir, "loss_ins": cfg.w_ins * ins}
    if len(m.filters):
        out["loss_filter"] = filter_loss
    return out


@pytest.mark.parametrize("reduction, target, topk, release, similarity", [
    ("norm", "features", 0, False, "learned"), ("norm", "matrix", 0, False, "learned"),
    ("mse", "features", 0, False, "learned"), ("mse", "matrix", 0, False, "learned"),
    ("mse", "both", 2, False, "learned"), ("norm", "features", 0, True, "learned"),
    ("norm", "both", 0, True, "learned"), ("mse", "both", 2, False, "cosine"),
    ("norm", "features", 0, True, "cosine")])
def test_losses_equal_an_independent_computation(reduction: str, target: str, topk: int,
                                                  release: bool, similarity: str) -> None:
    """Each DRKD term against the formulas written out per image (reference_drkd): GloRe from
    its weights, torchvision's roi_align on the whole student map (the implementation adapts
    the pooled patches instead), relations, filter, top-k and both reductions."""
    cfg = drkd_config(target, reduction, w_pr=0.5, w_ir=2.0, w_ins=3.0, release=release,
                      instance={"tau": 0.5, "topk": topk, "similarity": similarity})
    d = toy_distiller(cfg, c_s=8, c_t=12)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter non-trivial (W, BN weight would start at zero)
        for p in d.method.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in d.method.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    d.eval()  # BatchNorm on its running statistics
    sizes = (8, 4, 2, 1, 1)  # a 32 px padded batch
    s_maps, t_maps = fpn_maps(8, sizes, 3, seed=2), fpn_maps(12, sizes, 3, seed=3)
    # 4 instances in the first image: 3 partners a row, so top-k 2 drops one.
    boxes = box_targets([[1, 2, 12, 14], [8, 4, 30, 20], [16, 16, 28, 31], [20, 2, 31, 10]],
                        [[0, 0, 16, 16], [10, 12, 26, 30]], [[3, 3, 9, 9]])
    boxes[0]["labels"] = torch.tensor([1, 2, 1, 2])
    with torch.no_grad():
        losses = {k: v.item() for k, v in d.method(s_maps, t_maps, boxes, (32, 32)).items()}
        expected = reference_drkd(d, s_maps, t_maps, boxes, 32)
    assert losses == pytest.approx(expected, rel=1e-4)
    assert all(v > 0 for v in expected.values())


# -- (14) precision and degenerate shapes (issue 10's bugs) ----------------------------------


def test_instance_boxes_stay_fp32_under_bf16_autocast() -> None:
    """Boxes rounded to bf16 move by pixels at COCO sizes (1210.6 -> 1208): pooled features
    under bf16 autocast must equal fp32 pooling of the same map with the exact boxes."""
    d = toy_distiller(drkd_config(w_pr=0.0, w_ir=0.0), c_s=8, c_t=8)
    method = d.method
    size = 1600
    ramp = torch.arange(size // 8, dtype=torch.float32)
    smap = (ramp[None, :] + 0 * ramp[:, None])[None, None].expand(1, 8, -1, -1).contiguous()
    s_maps = [smap.to(torch.bfloat16)] + [torch.zeros(1, 8, 1, 1)] * 4  # bf16: exact integers
    boxes = [torch.tensor([[1210.6, 700.2, 1230.4, 712.9]])]
    rois, index = torch.tensor([[0.0, *boxes[0][0].tolist()]]), torch.zeros(1, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, e_t, _, _ = method.instance_features(0, s_maps, s_maps, rois, index, (size, size))
    exact = roi_align(smap, rois, 3, 1 / 8, 2, True).flatten(1)
    torch.testing.assert_close(e_t[0].float(), exact, rtol=0, atol=1e-3)
    rounded = roi_align(smap, rois.to(torch.bfloat16).float(), 3, 1 / 8, 2, True).flatten(1)
    assert (rounded - exact).abs().max() > 0.1  # the bug this guards against is visible


@pytest.mark.parametrize("standardize", [False, True])
def test_batch_one_distills_where_p7_is_one_pixel(standardize: bool) -> None:
    """GloRe's BatchNorm sees B*H*W = 1 pixel on P7 with batch 1: it must not raise; the
    standardised L_PR (one value per channel there) must stay finite."""
    d = toy_distiller(drkd_config(pixel=replace(SMALL_PIXEL, standardize=standardize)))
    d.train()
    images, targets = batch((3,))
    losses = d(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in d.method.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_glore_does_not_overflow_under_fp16() -> None:
    """V = X_s B^T sums HW products: a 100x168 map of constant 2s with projections of 2 gives
    |V| = 4 * 16800 = 67200 > fp16's 65504 before dividing by HW."""
    glore = GloRe(4, 2, 2).eval()
    with torch.no_grad():
        glore.project.weight.fill_(0.25)
        glore.project.bias.zero_()
        glore.norm.weight.fill_(1.0)
    x = torch.full((1, 4, 100, 168), 2.0)
    reference = glore(x)
    with torch.autocast("cpu", dtype=torch.float16):
        out = glore(x.half())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, rtol=1e-3, atol=1e-3)


def test_release_switch_builds_the_release_modules() -> None:
    d = toy_distiller(drkd_config("features", "norm", release=True), c_s=8, c_t=12)
    m = d.method
    assert all(g.norm.eps == 1e-4 and torch.all(g.norm.weight == 1) and not g.normalize
               for g in [*m.glore_s, *m.glore_t])
    assert m.relation_s[0].theta.in_features == 8 * 9 and m.relation_s[0].theta.out_features == 36
    assert m.relation_t[0].theta.out_features == 12 * 9 // 2  # D/2
    assert m.relation_t[0].theta.weight.requires_grad  # the release trains the teacher side
    assert m.relation_s[0].out.weight.abs().sum() > 0  # W not zero-initialised
    assert len(m.ir_adapters) == 2 and m.ir_adapters[0].in_features == 72
    ours = toy_distiller(drkd_config("features", "norm"), c_s=8, c_t=12).method
    assert len(ours.ir_adapters) == 0 and ours.glore_s[0].normalize


def test_distils_under_cpu_bf16_autocast() -> None:
    """What CUDA bf16 autocast does on a GPU, on CPU: every term finite, gradients reach the
    student and the DRKD modules."""
    d = toy_distiller(drkd_config("both"))
    d.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = d(*batch((0, 2, 4)))
    assert {"loss_pr", "loss_ir", "loss_ins"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in d.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
