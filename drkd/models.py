"""Torchvision detectors built from a ModelConfig, with no weight downloads ever.

``build_detector(cfg, num_classes)`` returns an unmodified torchvision
``RetinaNet``, ``FasterRCNN`` or ``FCOS`` whose backbone is a ResNet or
MobileNetV3 with an FPN of ``cfg.fpn_channels`` channels. Random init, or
weights from local files named in params. ``num_classes`` counts the
background, as torchvision expects (training labels are 1..K).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSClassificationHead, FCOSHead, FCOSRegressionHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from drkd.config import ModelConfig, UserError

RESNETS: dict[str, Callable[..., tvm.ResNet]] = {
    "resnet18": tvm.resnet18,
    "resnet34": tvm.resnet34,
    "resnet50": tvm.resnet50,
    "resnet101": tvm.resnet101,
}


def _group_norm(channels: int) -> nn.GroupNorm:
    # At least 2 channels per group: a 1x1 P7 map with 1 channel per group cannot be normalised.
    return nn.GroupNorm(math.gcd(32, max(channels // 2, 1)), channels)


def _norm_layer(kind: str) -> Callable[[int], nn.Module]:
    return {"batch": nn.BatchNorm2d, "frozen": FrozenBatchNorm2d, "group": _group_norm}[kind]


def _load_state(module: nn.Module, path: str, what: str, strict: bool = True) -> None:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{what}: weights file not found: {path}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"{what}: {path}: not a readable state dict ({type(err).__name__})"
                        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"{what}: {path}: not a state dict (top level is {type(state).__name__})")
    try:
        result = module.load_state_dict(state, strict=strict)
    except RuntimeError as err:  # shapes of another architecture (resnet50 weights, resnet18)
        first = next((line.strip() for line in str(err).splitlines()
                      if "size mismatch" in line or "Missing key" in line
                      or "Unexpected key" in line), str(err).splitlines()[0])
        raise UserError(f"{what}: {path} does not fit this model: {first}") from None
    if not strict and result.missing_keys:
        raise UserError(
            f"{what}: {path} lacks {len(result.missing_keys)} keys, e.g. {result.missing_keys[0]}"
        )


def _backbone(cfg: ModelConfig, levels: str) -> BackboneWithFPN:
    """Backbone + FPN. ``levels``: 'p2' -> C2..C5 + max-pool P6 (Faster R-CNN);
    'p3' -> C3..C5 + P6, P7 (RetinaNet, FCOS)."""
    norm = _norm_layer(cfg.norm)
    first = 1 if levels == "p2" else 2
    if cfg.backbone.startswith("resnet"):
        body: nn.Module = RESNETS[cfg.backbone](weights=None, norm_layer=norm)
        if cfg.backbone_weights:
            _load_state(body, cfg.backbone_weights, "model.backbone_weights", strict=False)
        width = 64 if cfg.backbone in ("resnet18", "resnet34") else 256
        stage_channels = [width * 2**i for i in range(4)]
        return_layers = {f"layer{i + 1}": str(k) for k, i in enumerate(range(first - 1, 4))}
        in_channels = stage_channels[first - 1 :]
    else:
        net = tvm.mobilenet_v3_large(weights=None, norm_layer=norm)
        if cfg.backbone_weights:
            _load_state(net, cfg.backbone_weights, "model.backbone_weights", strict=False)
        body = net.features
        blocks = list(body.children())
        # The block before each stride change ends a stage: its output is that stage's C_k.
        stages = [i - 1 for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [
            len(blocks) - 1
        ]
        picked = stages[-(5 - first) :] if levels == "p2" else stages[-3:]
        return_layers = {str(i): str(k) for k, i in enumerate(picked)}
        in_channels = [int(cast(int, blocks[i].out_channels)) for i in picked]
    extra = (
        LastLevelMaxPool() if levels == "p2" else LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels)
    )
    return BackboneWithFPN(body, return_layers, in_channels, cfg.fpn_channels, extra_blocks=extra)


def _anchors(
    cfg: ModelConfig, num_levels: int, scales: tuple[float, ...], ratios: tuple[float, ...]
) -> AnchorGenerator:
    sizes = tuple(tuple(cfg.anchor_size * 2**lvl * s for s in scales) for lvl in range(num_levels))
    return AnchorGenerator(sizes, (ratios,) * num_levels)


def build_detector(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """A torchvision detector; ``num_classes`` includes the background."""
    # detections_per_img is not common: Faster R-CNN names it box_detections_per_img, and its
    # **kwargs would swallow the other name.
    common = dict(min_size=cfg.min_size, max_size=cfg.max_size)
    model: nn.Module
    if cfg.arch == "retinanet":
        backbone = _backbone(cfg, "p3")
        anchors = _anchors(cfg, 5, (1.0, 2 ** (1 / 3), 2 ** (2 / 3)), (0.5, 1.0, 2.0))
        head = RetinaNetHead(
            cfg.fpn_channels,
            anchors.num_anchors_per_location()[0],
            num_classes,
            norm_layer=partial(_group_norm),
        )
        # A lighter head than the 4-conv default: at small inputs it costs more than the backbone.
        head.classification_head.conv = head.classification_head.conv[: cfg.head_convs]
        head.regression_head.conv = head.regression_head.conv[: cfg.head_convs]
        model = RetinaNet(
            backbone,
            num_classes,
            anchor_generator=anchors,
            head=head,
            score_thresh=cfg.score_thresh,
            detections_per_img=cfg.detections_per_img,
            **common,
        )
    elif cfg.arch == "fcos":
        backbone = _backbone(cfg, "p3")
        anchors = _anchors(cfg, 5, (1.0,), (1.0,))
        head = FCOSHead(cfg.fpn_channels, 1, num_classes, num_convs=0)
        # torchvision's default GroupNorm(32, c) needs c % 32 == 0; use ours, as RetinaNet does.
        head.classification_head = FCOSClassificationHead(
            cfg.fpn_channels, 1, num_classes, cfg.head_convs, norm_layer=_group_norm
        )
        head.regression_head = FCOSRegressionHead(
            cfg.fpn_channels, 1, cfg.head_convs, norm_layer=_group_norm
        )
        model = FCOS(
            backbone,
            num_classes,
            anchor_generator=anchors,
            head=head,
            score_thresh=cfg.score_thresh,
            detections_per_img=cfg.detections_per_img,
            **common,
        )
    else:
        backbone = _backbone(cfg, "p2")
        anchors = _anchors(cfg, 5, (1.0,), (0.5, 1.0, 2.0))
        model = FasterRCNN(
            backbone,
            num_classes,
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n,
            rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n,
            rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n,
            rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n,
            box_batch_size_per_image=cfg.roi_batch_size,
            box_score_thresh=cfg.score_thresh,
            box_detections_per_img=cfg.detections_per_img,
            **common,
        )
    if cfg.weights:
        _load_state(model, cfg.weights, "model.weights")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fpn_levels(features: OrderedDict[str, torch.Tensor]) -> list[torch.Tensor]:
    """FPN maps finest first, by position (names differ between detectors)."""
    return list(features.values())
