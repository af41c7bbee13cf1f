"""build_detector: each arch x backbone trains and predicts; FPN; norms; weights; checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from conftest import detecting, toy_model
from drkd import checkpoint
from drkd.config import UserError
from drkd.models import build_detector, count_parameters, fpn_levels

NUM_CLASSES = 4  # background + 3


def batch() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two 64 px images: one without boxes, one with three."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 64, 56, generator=g)]
    targets = [
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[2.0, 3.0, 30.0, 40.0], [10.0, 10.0, 20.0, 22.0],
                                [30.0, 5.0, 55.0, 60.0]]),
         "labels": torch.tensor([1, 3, 2])},
    ]
    return images, targets


LOSSES = {
    "retinanet": {"classification", "bbox_regression"},
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "faster_rcnn": {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"},
}


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn", "fcos"])
def test_train_and_eval_forward(arch: str, backbone: str) -> None:
    model = build_detector(toy_model(arch, backbone=backbone), NUM_CLASSES)
    images, targets = batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == LOSSES[arch]
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value) and value > 0, (name, value)
    total = torch.stack(list(losses.values())).sum()
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)

    # Made to detect (an untrained head scores nothing above score_thresh), plus a 32x40
    # image the transform upscales to 64 px, so boxes must be mapped back to it.
    detecting(model).eval()
    images = [*images, torch.rand(3, 32, 40)]
    with torch.no_grad():
        out = model(images)
    assert len(out) == 3
    cfg = toy_model(arch)
    for det, image in zip(out, images, strict=True):
        assert set(det) == {"boxes", "labels", "scores"}
        n = len(det["scores"])
        assert 0 < n <= cfg.detections_per_img
        assert det["boxes"].shape == (n, 4) and det["labels"].shape == (n,)
        # RetinaNet / FCOS score class 0 too (sigmoid, no softmax background): an untrained
        # one may predict it, so consumers must drop label 0.
        assert det["labels"].min() >= 0 and det["labels"].max() < NUM_CLASSES
        assert (det["scores"] >= cfg.score_thresh).all() and (det["scores"] <= 1).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all()  # best first
        # Boxes are x0 <= x1, y0 <= y1 in the original image's pixels.
        boxes = det["boxes"]
        h, w = image.shape[1:]
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
        assert boxes[:, 2].max() <= w + 1e-3 and boxes[:, 3].max() <= h + 1e-3


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn", "fcos"])
def test_detections_per_img_caps_every_arch(arch: str) -> None:
    """`detections_per_img` reaches each detector under its own name (Faster R-CNN's is
    box_detections_per_img: given the other, it kept 100)."""
    model = detecting(build_detector(toy_model(arch, detections_per_img=3), NUM_CLASSES)).eval()
    images, _ = batch()
    with torch.no_grad():
        out = model(images)
    assert [len(det["scores"]) for det in out] == [3] * len(images)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
@pytest.mark.parametrize(
    ("arch", "strides"),
    [("retinanet", [8, 16, 32, 64, 128]), ("fcos", [8, 16, 32, 64, 128]),
     ("faster_rcnn", [4, 8, 16, 32, 64])],
)
def test_fpn_levels(arch: str, backbone: str, strides: list[int]) -> None:
    """RetinaNet / FCOS: P3-P7; Faster R-CNN: P2-P6; every map has fpn_channels channels."""
    model = build_detector(toy_model(arch, backbone=backbone, fpn_channels=24), NUM_CLASSES)
    model.eval()
    size = 256
    with torch.no_grad():
        features = fpn_levels(model.backbone(torch.zeros(1, 3, size, size)))
    assert len(features) == len(strides)
    assert [size // f.shape[-1] for f in features] == strides
    assert [f.shape[1] for f in features] == [24] * len(strides)
    assert model.backbone.out_channels == 24


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn", "fcos"])
def test_fpn_channels_honoured_in_head(arch: str) -> None:
    model = build_detector(toy_model(arch, fpn_channels=16), NUM_CLASSES)
    fpn = model.backbone.fpn
    assert [c.out_channels for c in fpn.layer_blocks] == [16] * len(fpn.layer_blocks)
    # The head consumes fpn_channels.
    head = model.rpn.head if arch == "faster_rcnn" else model.head
    first = next(m for m in head.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 16


def test_head_convs_honoured() -> None:
    for arch in ("retinanet", "fcos"):
        model = build_detector(toy_model(arch, head_convs=1), NUM_CLASSES)
        for head in (model.head.classification_head, model.head.regression_head):
            assert sum(isinstance(m, nn.Conv2d) for m in head.conv.modules()) == 1, arch
        deeper = build_detector(toy_model(arch, head_convs=3), NUM_CLASSES)
        assert count_parameters(deeper.head) > count_parameters(model.head)


def test_anchor_generator_matches_levels() -> None:
    model = build_detector(toy_model("retinanet", anchor_size=8), NUM_CLASSES)
    sizes = model.anchor_generator.sizes
    assert len(sizes) == 5
    assert [round(s[0]) for s in sizes] == [8, 16, 32, 64, 128]
    assert model.anchor_generator.num_anchors_per_location() == [9] * 5


def test_batch_norm_is_trainable() -> None:
    model = build_detector(toy_model("retinanet", norm="batch"), NUM_CLASSES)
    body = model.backbone.body
    bns = [m for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.weight.requires_grad for m in bns)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())


def test_frozen_norm() -> None:
    model = build_detector(toy_model("faster_rcnn", norm="frozen"), NUM_CLASSES)
    body = model.backbone.body
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())


def test_group_norm() -> None:
    model = build_detector(toy_model("fcos", norm="group"), NUM_CLASSES)
    body = model.backbone.body
    assert any(isinstance(m, nn.GroupNorm) for m in body.modules())
    assert not any(isinstance(m, nn.BatchNorm2d | FrozenBatchNorm2d) for m in body.modules())


def test_weights_file_is_loaded(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_detector(toy_model("retinanet"), NUM_CLASSES)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    fresh = build_detector(toy_model("retinanet"), NUM_CLASSES)
    assert not all(torch.equal(a, b) for a, b in zip(
        source.state_dict().values(), fresh.state_dict().values(), strict=True))
    torch.manual_seed(2)
    loaded = build_detector(toy_model("retinanet", weights=str(path)), NUM_CLASSES)
    expected = source.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


def test_weights_from_model_checkpoint(tmp_path: Path) -> None:
    """A drkd model checkpoint ({'model': state_dict, ...}) also works as `weights:`."""
    cfg = toy_model("fcos")
    source = build_detector(cfg, NUM_CLASSES)
    path = tmp_path / "ckpt.pt"
    checkpoint.save_atomic(checkpoint.model_checkpoint(source, cfg, [1, 2, 3], ["a", "b", "c"]),
                           path)
    loaded = build_detector(toy_model("fcos", weights=str(path)), NUM_CLASSES)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.pt"
    with pytest.raises(UserError) as info:
        build_detector(toy_model("retinanet", weights=str(path)), NUM_CLASSES)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_backbone_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pt"
    with pytest.raises(UserError, match="backbone_weights"):
        build_detector(toy_model("retinanet", backbone_weights=str(path)), NUM_CLASSES)


def test_unusable_weights_files_are_one_line(tmp_path: Path) -> None:
    """Not a state dict, or one of another architecture: one line naming the key and the file
    (not an unpickling or size-mismatch traceback)."""
    from torchvision.models import resnet18

    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    other = tmp_path / "other.pt"  # a first conv of another shape (another architecture's)
    torch.save({**resnet18(weights=None).state_dict(), "conv1.weight": torch.zeros(64, 3, 3, 3)},
               other)
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    for path, says in ((text, "not a readable state dict"), (listed, "top level is list"),
                       (other, "does not fit this model: size mismatch")):
        with pytest.raises(UserError) as info:
            build_detector(toy_model("retinanet", backbone_weights=str(path)), NUM_CLASSES)
        message = str(info.value)
        assert message.startswith(f"model.backbone_weights: {path}") and says in message
        assert "\n" not in message
    with pytest.raises(UserError, match=f"model.weights: {text}: not a readable state dict"):
        build_detector(toy_model("retinanet", weights=str(text)), NUM_CLASSES)


def test_backbone_weights_loaded(tmp_path: Path) -> None:
    """An ImageNet classifier state_dict (with an fc the detector lacks) seeds the backbone."""
    from torchvision.models import resnet18

    torch.manual_seed(5)
    classifier = resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save(classifier.state_dict(), path)
    model = build_detector(toy_model("retinanet", backbone_weights=str(path)), NUM_CLASSES)
    body = model.backbone.body.state_dict()
    for key, value in body.items():
        assert torch.equal(value, classifier.state_dict()[key]), key


def test_bigger_resnets_build() -> None:
    small = count_parameters(build_detector(toy_model("retinanet"), NUM_CLASSES))
    r34 = count_parameters(build_detector(toy_model("retinanet", backbone="resnet34"), NUM_CLASSES))
    assert small < r34
    # resnet18 body ~11.2M params (without fc); resnet34 ~21.3M.
    assert 10_000_000 < small < 12_000_000
    assert 20_000_000 < r34 < 22_500_000


@pytest.mark.slow
def test_resnet50_builds() -> None:
    r34 = count_parameters(build_detector(toy_model("retinanet", backbone="resnet34"), NUM_CLASSES))
    r50 = count_parameters(build_detector(toy_model("retinanet", backbone="resnet50"), NUM_CLASSES))
    assert r34 < r50
    # resnet50 body ~23.5M params (without fc), its FPN reads 4x wider maps.
    assert 23_000_000 < r50 < 26_000_000


def test_save_atomic_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.pt"
    checkpoint.save_atomic({"a": torch.arange(3)}, path)
    checkpoint.save_atomic({"a": torch.arange(4)}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.pt"]
    assert torch.equal(checkpoint.load(path)["a"], torch.arange(4))


def test_equal_checkpoints_are_equal_bytes(tmp_path: Path) -> None:
    """A retrained model of the same weights must not look new to DVC or change a compare_id:
    the bytes may not depend on the temp file's random name (torch.save of a path puts it in
    the archive)."""
    state = {"model": {"w": torch.arange(6.0)}, "category_ids": [1, 2]}
    checkpoint.save_atomic(state, tmp_path / "a.pt")
    checkpoint.save_atomic(state, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()


def test_save_atomic_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    checkpoint.save_atomic({"a": torch.ones(2)}, path)
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises
        checkpoint.save_atomic({"a": lambda: 0}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(2))


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path: Path) -> None:
    """Not the 0600 of a mkstemp temp file: a report or checkpoint must stay readable by
    whoever may read what this user writes (umask 022 -> 0644)."""
    old = os.umask(0o022)
    try:
        checkpoint.save_atomic({"a": torch.ones(1)}, tmp_path / "state.pt")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"state.pt": 0o644, "plain.txt": 0o644}


def test_load_truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    checkpoint.save_atomic({"a": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message


def test_load_missing_and_foreign_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "none.pt")
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="not a drkd checkpoint"):
        checkpoint.load(path)
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="not a model checkpoint"):
        checkpoint.load_detector(path)
    model = build_detector(toy_model(), NUM_CLASSES)
    state = checkpoint.model_checkpoint(model, toy_model(), [1, 2], ["a", "b"])
    del state["category_names"]
    checkpoint.save_atomic(state, path)
    with pytest.raises(UserError, match=r"list.pt: not a model checkpoint \(no 'category_names'\)"):
        checkpoint.load_detector(path)
    state = checkpoint.model_checkpoint(model, toy_model(fpn_channels=24), [1, 2], ["a", "b"])
    checkpoint.save_atomic(state, path)  # 16-channel weights, a 24-channel config
    with pytest.raises(UserError) as unfit:
        checkpoint.load_detector(path)
    assert str(unfit.value).startswith(f"{path}: weights do not fit its model_config (Error(s)")
    assert "\n" not in str(unfit.value)


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
def test_load_detector_rebuilds_equal_model(tmp_path: Path, arch: str) -> None:
    cfg = toy_model(arch, fpn_channels=8, norm="group", weights=str(tmp_path / "gone.pt"))
    torch.manual_seed(3)
    model = build_detector(toy_model(arch, fpn_channels=8, norm="group"), NUM_CLASSES)
    path = tmp_path / "model.pt"
    # A config whose weights file has since gone must still rebuild (weights are in the file).
    checkpoint.save_atomic(checkpoint.model_checkpoint(model, cfg, [3, 5, 9], ["x", "y", "z"]),
                           path)
    rebuilt, state = checkpoint.load_detector(path)
    assert type(rebuilt) is type(model)
    assert state["category_ids"] == [3, 5, 9] and state["category_names"] == ["x", "y", "z"]
    assert state["num_classes"] == NUM_CLASSES
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    model.eval()
    rebuilt.eval()
    images, _ = batch()
    with torch.no_grad():
        a, b = model(images), rebuilt(images)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["boxes"], y["boxes"]) and torch.equal(x["scores"], y["scores"])
