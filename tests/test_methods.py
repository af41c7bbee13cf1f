"""The peer methods (drkd/methods: PKD, CWD, MGD, FGD, mimic) against independent
computations of their papers' formulas, written out here per image and channel; zero loss
where a method defines one; gradients to the student and the method's modules, never the
teacher; plain exported students; and every method under 2-process gloo DDP."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_kd_reaches_student_features_only, fpn_maps, toy_distiller, toy_model
from drkd.config import DistillConfig
from drkd.distiller import Distiller
from drkd.methods.fgd import box_masks
from drkd.models import build_detector, count_parameters
from drkd.registry import CwdConfig, FgdConfig, MgdConfig, PkdConfig

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4
PEERS = ("pkd", "cwd", "mgd", "fgd")
# Each method's loss terms, written out: the independent check of what its module returns.
TERMS = {"mimic": {"loss_mimic"}, "pkd": {"loss_pkd"}, "cwd": {"loss_cwd"}, "mgd": {"loss_mgd"},
         "fgd": {"loss_fgd_fg", "loss_fgd_bg", "loss_fgd_att", "loss_fgd_global"}}


def test_the_tables_above_cover_every_registered_method() -> None:
    """A newly registered method must be added here, so the per-method tests below run on it."""
    from drkd import registry

    assert {*PEERS, "mimic"} == set(TERMS) and set(registry.names()) == {*TERMS, "drkd"}


SIZES = ((8, 12), (4, 6), (2, 3), (1, 2), (1, 1))  # P3-P7 of a 64 x 96 padded batch
STRIDES = (8, 16, 32, 64, 128)
# Off-centre, wider maps than randn's: PKD's and CWD's normalisations have work to do.
maps = partial(fpn_maps, mean=0.5, std=2.0)


def distill_config(method: str, **cfg: object) -> DistillConfig:
    """DistillConfig with ``cfg``'s fields and method sections (e.g. ``pkd=PkdConfig(...)``)."""
    sections = {k: v for k, v in cfg.items() if k in DistillConfig().sections}
    fields = {k: v for k, v in cfg.items() if k not in sections}
    return DistillConfig(method=method, sections={**DistillConfig().sections, **sections},
                         **fields)  # type: ignore[arg-type]


def distiller(method: str, c_s: int = 16, c_t: int = 24, **cfg: object) -> Distiller:
    return toy_distiller(distill_config(method, **cfg), c_s=c_s, c_t=c_t)


def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]),
             torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 64.0, 64.0]])]
    return ([torch.rand(3, 64, 64, generator=g) for _ in boxes],
            [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes])


# -- each loss against its formula ------------------------------------------------------------


def test_pkd_is_one_minus_pearson_per_channel() -> None:
    """PKD: MSE of standardised maps / 2 = (M-1)/M * mean_c (1 - r_c), r_c the Pearson
    correlation of channel c over batch and positions (M of them)."""
    method = distiller("pkd", 8, 8, pkd=PkdConfig(weight=3.0)).method
    s, t = maps(8, SIZES, seed=1), maps(8, SIZES, seed=2)
    t = [0.5 * a + b for a, b in zip(s, t, strict=True)]  # correlated, so r is not ~0
    expected = 0.0
    for a, b in zip(s, t, strict=True):
        m = a.shape[0] * a.shape[2] * a.shape[3]
        r = [torch.corrcoef(torch.stack([a[:, c].flatten(), b[:, c].flatten()]))[0, 1]
             for c in range(a.shape[1])]
        expected += (m - 1) / m * float(torch.stack(r).sub(1).neg().mean())
    got = method(s, t, [], (64, 96))["loss_pkd"].item()
    assert got == pytest.approx(3.0 * expected, rel=1e-4)


def test_cwd_is_channel_kl_times_tau_squared() -> None:
    method = distiller("cwd", 8, 8, cwd=CwdConfig(weight=2.0, tau=3.0)).method
    s, t = maps(8, SIZES, seed=1), maps(8, SIZES, seed=2)
    expected = 0.0
    for a, b in zip(s, t, strict=True):
        for i in range(a.shape[0]):
            for c in range(a.shape[1]):
                p = torch.softmax(b[i, c].flatten() / 3.0, 0)
                q = torch.softmax(a[i, c].flatten() / 3.0, 0)
                expected += float((p * (p / q).log()).sum()) * 9.0 / (a.shape[0] * a.shape[1])
    got = method(s, t, [], (64, 96))["loss_cwd"].item()
    assert got == pytest.approx(2.0 * expected, rel=1e-4)


def test_mgd_generates_the_teacher_from_the_unmasked_student() -> None:
    method = distiller("mgd", 8, 12, mgd=MgdConfig(weight=0.5, mask_ratio=0.0)).method
    assert method is not None
    s, t = maps(8, SIZES, seed=1), maps(12, SIZES, seed=2)
    expected = 0.0
    for level, (a, b) in enumerate(zip(s, t, strict=True)):
        align, gen = method.adapters[level], method.generators[level]
        x = F.conv2d(a, align.weight, align.bias)
        x = F.conv2d(F.relu(F.conv2d(x, gen[0].weight, gen[0].bias, padding=1)),
                     gen[2].weight, gen[2].bias, padding=1)
        expected += ((x - b) ** 2).sum().item() / a.shape[0]
    got = method(s, t, [], (64, 96))["loss_mgd"].item()
    assert got == pytest.approx(0.5 * expected, rel=1e-4)


def test_mgd_masks_the_configured_fraction() -> None:
    method = distiller("mgd", 8, 8, mgd=MgdConfig(mask_ratio=0.65)).method
    seen: list[torch.Tensor] = []
    gen = method.generators[0]
    gen[0].register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    s = [torch.ones(4, 8, 32 >> i, 32 >> i) for i in range(5)]
    method(s, [torch.zeros_like(m) for m in s], [], (256, 256))
    dropped = float((seen[0][:, 0] == 0).float().mean())
    assert dropped == pytest.approx(0.65, abs=0.03)
    assert torch.equal(seen[0][:, :1].expand_as(seen[0]) == 0, seen[0] == 0)  # whole pixels


def reference_fgd_masks(boxes: torch.Tensor, h: int, w: int, stride: int,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """FGD's masks for one image, cell by cell: a box's cells are those its interior overlaps
    (cell r spans pixels [r, r + 1) x the level's ``stride``; the last row or column of a map
    its stride does not divide is partly padding), each weighing 1 / their number (H_r W_r);
    where boxes overlap, the larger weight."""
    fg = torch.zeros(h, w)
    for x1, y1, x2, y2 in boxes.tolist():
        x1, x2, y1, y2 = x1 / stride, x2 / stride, y1 / stride, y2 / stride
        inside = [(r, c) for r in range(h) for c in range(w)
                  if r < y2 and r + 1 > y1 and c < x2 and c + 1 > x1]
        for r, c in inside:
            fg[r, c] = max(fg[r, c].item(), 1 / len(inside))
    bg = (fg == 0).float()
    return fg, bg / bg.sum() if bg.sum() > 0 else bg


def test_fgd_masks() -> None:
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]), torch.zeros(0, 4),
             torch.tensor([[0.0, 0.0, 96.0, 64.0]])]
    fg, bg = box_masks(boxes, (8, 12), (64, 96))
    for i, b in enumerate(boxes):
        ref_fg, ref_bg = reference_fgd_masks(b, 8, 12, stride=8)
        torch.testing.assert_close(fg[i], ref_fg)
        torch.testing.assert_close(bg[i], ref_bg)
    assert fg[1].sum() == 0 and bg[1].sum() == pytest.approx(1.0)  # no boxes: all background
    assert bg[2].sum() == 0 and (fg[2] > 0).all()  # a box covering the image: no background
    assert fg[2].sum() == pytest.approx(1.0)  # one box weighs 1 in all (1 / (H_r W_r) a cell)
    # 4 cells wide and 2 high on the 8 x 12 map: 8 cells of 1/8 (the release counted 5 x 3).
    four, _ = box_masks([torch.tensor([[8.0, 16.0, 40.0, 32.0]])], (8, 12), (64, 96))
    assert (four[0] > 0).sum() == 8 and four[0].max() == pytest.approx(1 / 8)
    # A map its stride does not divide (192 px rows at stride 128: 2 rows, the second partial):
    # boxes map by the stride, not by the map's share of the batch (which gives rows 1..1 here).
    coarse, _ = box_masks([torch.tensor([[0.0, 100.0, 50.0, 180.0]])], (2, 2), (192, 256))
    assert (coarse[0].view(2, 2)[:, 0] > 0).tolist() == [True, True]
    # A batch side of 160 at stride 128: 2 columns, 80 px a map cell; the stride is still 128.
    far, _ = box_masks([torch.tensor([[100.0, 0.0, 120.0, 20.0]])], (1, 2), (128, 160))
    assert (far[0].view(1, 2)[0] > 0).tolist() == [True, False]
    # Rows are y: a wide, short box covers few rows and many columns.
    wide, _ = box_masks([torch.tensor([[0.0, 0.0, 96.0, 8.0]])], (8, 12), (64, 96))
    assert (wide[0].sum(1) > 0).sum() == 1 and (wide[0].sum(0) > 0).all()


def test_fgd_terms_equal_the_papers_formulas() -> None:
    cfg = FgdConfig(temperature=0.7, alpha=2.0, beta=3.0, gamma=5.0, lam=7.0)
    method = distiller("fgd", 8, 8, fgd=cfg).method
    assert method is not None
    with torch.no_grad():  # a non-zero global branch on both sides
        for p in [*method.context_s.parameters(), *method.context_t.parameters()]:
            p.copy_(torch.randn(p.shape) * 0.3)
    s, t = maps(8, SIZES, batch_size=3, seed=1), maps(8, SIZES, batch_size=3, seed=2)
    # Two overlapping boxes; no box (all background); one box covering the image (no background).
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]), torch.zeros(0, 4),
             torch.tensor([[0.0, 0.0, 96.0, 64.0]])]
    expected = dict.fromkeys(("fg", "bg", "att", "global"), 0.0)
    for level, (a, b) in enumerate(zip(s, t, strict=True)):
        n, c, h, w = a.shape
        for i in range(n):
            fg, bg = reference_fgd_masks(boxes[i], h, w, STRIDES[level])
            att = {}
            for side, x in (("s", a[i]), ("t", b[i])):
                spatial = h * w * torch.softmax((x.abs().mean(0) / 0.7).flatten(), 0).view(h, w)
                channel = c * torch.softmax(x.abs().mean((1, 2)) / 0.7, 0)
                att[side] = (spatial, channel)
            weight = att["t"][0][None] * att["t"][1][:, None, None]
            err = (a[i] - b[i]) ** 2 * weight
            expected["fg"] += float((err * fg).sum()) / n
            expected["bg"] += float((err * bg).sum()) / n
            expected["att"] += float((att["s"][0] - att["t"][0]).abs().sum()
                                     + (att["s"][1] - att["t"][1]).abs().sum()) / n
            outs = []
            for block, x in ((method.context_s[level], a[i]), (method.context_t[level], b[i])):
                logits = F.conv2d(x[None], block.mask.weight, block.mask.bias).flatten()
                context = x.flatten(1) @ torch.softmax(logits, 0)  # (C,)
                conv1, norm, _, conv2 = block.transform
                hidden = F.conv2d(context[None, :, None, None], conv1.weight, conv1.bias)
                hidden = F.relu(F.layer_norm(hidden, hidden.shape[1:], norm.weight, norm.bias))
                outs.append(x + F.conv2d(hidden, conv2.weight, conv2.bias)[0])
            expected["global"] += ((outs[0] - outs[1]) ** 2).sum().item() / n
    with torch.no_grad():
        got = {k.removeprefix("loss_fgd_"): v.item()
               for k, v in method(s, t, [{"boxes": b} for b in boxes], (64, 96)).items()}
    weights = {"fg": 2.0, "bg": 3.0, "att": 5.0, "global": 7.0}
    assert got == pytest.approx({k: weights[k] * v for k, v in expected.items()}, rel=1e-4)
    assert all(v > 0 for v in expected.values())


# -- what every method shares -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["pkd", "cwd", "fgd", "mimic"])
def test_identical_maps_give_zero_loss(method: str) -> None:
    d = distiller(method, 16, 16)
    assert d.method is not None
    if method == "mimic":  # always adapts: make it the identity
        with torch.no_grad():
            for a in d.method.adapters:
                a.weight.copy_(torch.eye(16).view(16, 16, 1, 1))
                a.bias.zero_()
    s = maps(16, SIZES)
    boxes = [torch.tensor([[4.0, 6.0, 30.0, 40.0]]), torch.zeros(0, 4)]
    losses = d.method(s, [m.clone() for m in s], [{"boxes": b} for b in boxes], (64, 96))
    assert set(losses) == TERMS[method]
    assert all(abs(v.item()) < 1e-5 for v in losses.values()), losses


@pytest.mark.parametrize("method", [*PEERS, "mimic"])
def test_gradients_reach_student_and_method_never_teacher(method: str) -> None:
    d = distiller(method)
    d.train()
    losses = d(*batch())
    assert TERMS[method] <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    for term in TERMS[method]:
        assert_kd_reaches_student_features_only(d, losses[term])
    sum(losses.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())
    assert all(p.grad is not None for p in d.student.backbone.parameters())
    # Every trainable parameter of the method gets a gradient (no find_unused_parameters).
    assert d.method is not None
    missing = [n for n, p in d.method.named_parameters() if p.grad is None]
    assert missing == [] and any(True for _ in d.method.parameters())
    assert not d.teacher.training
    # The export is a plain detector: the baseline's parameter count.
    assert count_parameters(d.student) == count_parameters(
        build_detector(toy_model(fpn_channels=16), NUM_CLASSES))
    assert "method." in " ".join(d.modules_checkpoint()["modules"])


def test_method_weight_from_params_scales_its_terms() -> None:
    """`distill.pkd.weight` 2.5 gives a quarter of weight 10 (the default) on the same maps
    and the same (seeded) adapters."""
    s, t = maps(16, SIZES), maps(24, SIZES, seed=1)
    losses = []
    for weight in (10.0, 2.5):
        torch.manual_seed(0)
        d = distiller("pkd", pkd=PkdConfig(weight=weight))
        losses.append(d.method(s, t, [], (64, 96))["loss_pkd"].item())
    assert losses[1] == pytest.approx(0.25 * losses[0])


def test_params_select_and_validate_methods() -> None:
    from drkd.config import ConfigError, parse_params

    params = parse_params({"distill": {"method": "fgd", "fgd": {"alpha": 0.002}}})
    assert params.distill.fgd == replace(FgdConfig(), alpha=0.002)
    with pytest.raises(ConfigError, match=r"distill\.method"):
        parse_params({"distill": {"method": "kd"}})
    with pytest.raises(ConfigError, match=r"distill\.mgd\.mask_ratio"):
        parse_params({"distill": {"mgd": {"mask_ratio": 1.5}}})
    with pytest.raises(ConfigError, match=r"distill\.cwd\.temp"):
        parse_params({"distill": {"cwd": {"temp": 1.0}}})


class ReadKeys:
    """A DistillConfig that records which of its top-level keys are read."""

    def __init__(self, cfg: DistillConfig) -> None:
        self._cfg, self.read = cfg, set()

    def __getattr__(self, name: str) -> object:
        self.read.add(name)
        return getattr(self._cfg, name)


@pytest.mark.parametrize("method, cfg, unread", [
    ("none", {}, set()), ("mimic", {}, set()), *((m, {}, set()) for m in PEERS),
    ("drkd", {}, set()),
    ("drkd", {"instance": replace(DistillConfig().instance, target="both")}, set()),
    ("drkd", {"release": True}, set()),
    ("drkd", {"reduction": "norm", "w_pr": 0.0}, {"pixel"})])  # L_PR off: no GloRe sizes read
def test_method_keys_are_what_each_method_reads(method: str, cfg: dict[str, object],
                                                unread: set[str]) -> None:
    """The keys a method's registration says it reads (what a compare cell depends on) are
    exactly the `distill` keys it reads while it is built and trains a step: a key missing
    would let a cell keep a stale result, an extra one rerun it for nothing."""
    from drkd import registry

    keys = ReadKeys(distill_config(method, **cfg))
    student = build_detector(toy_model(fpn_channels=16), NUM_CLASSES)
    teacher = build_detector(toy_model(fpn_channels=24), NUM_CLASSES)
    d = Distiller(student, teacher, keys)  # type: ignore[arg-type]
    d.train()
    sum(d(*batch()).values()).backward()
    # `plus` and `init_student` are read by every distilling build and are in a row's file
    # whenever they say something (drkd.config.method_distill), so their defaults need no key.
    reads = registry.METHODS[method].reads() if method != "none" else ()
    expected = {"method", *(["plus", "init_student"] if method != "none" else []), *reads}
    assert keys.read == expected - unread


def test_method_keys_cover_every_method_and_key() -> None:
    """Every `distill` key (the sections included) is read by some registered method."""
    import dataclasses

    from drkd import registry
    from drkd.config import to_dict

    read = {k for spec in registry.METHODS.values() for k in spec.reads()}
    assert read == set(to_dict(DistillConfig())) - {"method", "plus", "init_student"}
    assert {f.name for f in dataclasses.fields(DistillConfig)} - read == {
        "method", "plus", "init_student", "sections"}


@pytest.mark.slow
def test_every_method_under_ddp(tmp_path: Path) -> None:
    """2 gloo processes, DDP without find_unused_parameters, 2 steps per method (DRKD also
    with a term off): an unused parameter or a rank mismatch fails the second step."""
    from conftest import free_port, single_process_env

    env = {**single_process_env(), "PYTHONPATH": str(ROOT / "tests")}

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}",
         str(ROOT / "tests" / "ddp_methods.py"), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = sorted(p.name for p in tmp_path.iterdir())
    expected = ("drkd", "drkd-learned", "drkd-no-ir", "drkd-release-ir", *PEERS, "mimic")
    assert done == sorted(f"{m}.ok" for m in expected), done


def test_module_is_an_nn_module() -> None:
    assert isinstance(distiller("cwd").method, nn.Module) and distiller("none").method is None


@pytest.mark.parametrize("method", ["drkd", *PEERS])
def test_portrait_and_landscape_in_one_batch(method: str) -> None:
    """Real inputs: a portrait and a landscape image in one padded, non-square batch (48-64
    px sides, aspect kept) distil with finite terms, and the probe accepts the pair."""
    cfg = {"min_size": 48, "max_size": 96}
    student = build_detector(toy_model(fpn_channels=16, **cfg), NUM_CLASSES)
    teacher = build_detector(toy_model(fpn_channels=24, **cfg), NUM_CLASSES)
    small = {"pixel": replace(DistillConfig().pixel, nodes=(4,) * 5, states=(8,) * 5)}
    d = Distiller(student, teacher, DistillConfig(method=method, **small))  # type: ignore[arg-type]
    d.train()
    g = torch.Generator().manual_seed(0)
    # portrait 60x50 -> 58x48, landscape 60x90 -> 48x72: one 64x96 padded batch
    images = [torch.rand(3, 60, 50, generator=g), torch.rand(3, 60, 90, generator=g)]
    boxes = [torch.tensor([[5.0, 10.0, 40.0, 55.0], [30.0, 5.0, 48.0, 30.0]]),
             torch.tensor([[10.0, 5.0, 80.0, 40.0], [2.0, 30.0, 20.0, 55.0]])]
    targets = [{"boxes": b, "labels": torch.tensor([1, 2])} for b in boxes]
    seen: list[torch.Size] = []
    d.student.backbone.register_forward_hook(lambda _m, x, _o: seen.append(x[0].shape[-2:]))
    losses = d(images, targets)
    assert tuple(seen[0]) == (64, 96)
    expected = TERMS.get(method, {"loss_pr", "loss_ir", "loss_ins"})
    assert all(torch.isfinite(v) for v in losses.values()) and set(losses) >= expected
    sum(losses.values()).backward()


# -- several methods' terms at once (distill.plus) --------------------------------------------


def test_plus_adds_each_methods_own_terms() -> None:
    """`method: mgd, plus: [drkd]` with DRKD's PR and INS off: the terms of MGD and of DRKD's
    relation loss, each exactly what that method alone computes with the same module weights,
    and the gradient of each reaching the student."""
    from drkd.methods import Combined

    small = {"pixel": replace(DistillConfig().pixel, nodes=(4,) * 5, states=(8,) * 5)}
    cfg = dict(w_pr=0.0, w_ins=0.0, **small)
    both = distiller("mgd", plus=("drkd",), **cfg)
    assert isinstance(both.method, Combined) and len(both.method.parts) == 2
    mgd, drkd = distiller("mgd", **cfg), distiller("drkd", **cfg)
    mgd.method.load_state_dict(both.method.parts[0].state_dict())
    drkd.method.load_state_dict(both.method.parts[1].state_dict())
    s, t = maps(16, SIZES), maps(24, SIZES, seed=1)
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0],
                                        [40.0, 2.0, 90.0, 30.0]]),
                "labels": torch.tensor([1, 2, 1])}, {"boxes": torch.zeros(0, 4),
                                                       "labels": torch.zeros(0, dtype=torch.long)}]
    torch.manual_seed(3)  # MGD's random mask
    together = both.method(s, t, targets, (64, 96))
    torch.manual_seed(3)
    alone = {**mgd.method(s, t, targets, (64, 96)), **drkd.method(s, t, targets, (64, 96))}
    assert set(together) == {"loss_mgd", "loss_ir", "loss_filter"} == set(alone)
    for name, value in together.items():
        assert torch.equal(value, alone[name]), name
    assert together["loss_mgd"] > 0 and together["loss_ir"] > 0


def test_plus_is_validated_and_widens_what_a_row_reads() -> None:
    from drkd.config import ConfigError, method_distill, parse_params, to_dict

    with pytest.raises(ConfigError, match=r"distill.plus\[0\]: mgd is already among"):
        parse_params({"distill": {"method": "mgd", "plus": ["mgd"]}})
    with pytest.raises(ConfigError, match=r"compare.methods.x.plus\[1\]: drkd is already"):
        parse_params({"compare": {"methods": {"x": {"method": "mgd", "plus": ["drkd", "drkd"]}}}})
    with pytest.raises(ConfigError, match="plus: needs a method to add to"):
        parse_params({"distill": {"method": "none", "plus": ["drkd"]}})
    with pytest.raises(ConfigError, match="distill.plus"):
        parse_params({"distill": {"plus": ["dkd"]}})
    distill = to_dict(DistillConfig(method="mgd", plus=("drkd",)))
    assert list(method_distill(distill)) == ["method", "plus", "mgd", "reduction", "release",
                                              "w_pr", "w_ir", "w_ins", "pixel", "instance"]
    assert "plus" not in method_distill(to_dict(DistillConfig(method="mgd")))
