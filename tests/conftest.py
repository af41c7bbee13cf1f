"""Shared fixtures and helpers: a tiny prepared synthetic dataset, toy detector configs, a toy
detector that detects, toy distillers and FPN maps, the tuning tests' toy study, fake
evaluation metrics and the figures the plotting code saves."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import yaml

from drkd.checkpoint import model_checkpoint, save_atomic
from drkd.config import (
    DataConfig,
    DistillConfig,
    InstanceRelationConfig,
    ModelConfig,
    PixelRelationConfig,
    SyntheticConfig,
    TrainConfig,
    load_params,
    merge,
)
from drkd.data.coco import CocoDetection
from drkd.data.prepare import prepare
from drkd.distiller import Distiller
from drkd.models import build_detector

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TINY_DATA = SyntheticConfig(
    num_train=8,
    num_val=4,
    image_size=64,
    min_objects=1,
    max_objects=4,
    min_object_size=6,
    max_object_size=40,
    distractors=2,
)


def toy_model(arch: str = "retinanet", **overrides: object) -> ModelConfig:
    """A real torchvision detector, shrunk: 16-channel FPN, 64 px inputs."""
    fields: dict[str, object] = dict(
        arch=arch,
        backbone="resnet18",
        fpn_channels=16,
        min_size=64,
        max_size=64,
        anchor_size=8,
        rpn_pre_nms_top_n=100,
        rpn_post_nms_top_n=50,
        roi_batch_size=32,
    )
    fields.update(overrides)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def toy_train(**overrides: object) -> TrainConfig:
    fields: dict[str, object] = dict(
        epochs=1, batch_size=2, lr=1e-3, warmup_steps=2, num_workers=0, log_every=1, amp="off"
    )
    fields.update(overrides)
    return TrainConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/prepared-like folder with 8 train / 4 val synthetic 64 px images."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(DataConfig(source="synthetic", synthetic=TINY_DATA), seed=0, out_dir=out)
    return out


@pytest.fixture(autouse=True)
def _own_mlflow_store() -> Iterator[None]:
    """mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI, which drkd honours over params:
    one test's store must not reach the next test or its subprocesses."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)


def toy_section(**model: object) -> dict[str, Any]:
    """A `teacher`/`student` params section: the toy detector, 1 epoch of batch 2."""
    fields = {k: v for k, v in vars(toy_model(**model)).items()
              if k not in ("weights", "backbone_weights")}
    return {"model": fields, "train": {"epochs": 1, "batch_size": 2, "num_workers": 0,
                                       "warmup_steps": 2, "log_every": 1, "amp": "off"}}


def toy_params(path: Path, **sections: Any) -> Path:
    """The one toy params file of the tests: tiny synthetic data, toy teacher and student,
    tracking off; ``sections`` are merged on top (any key, nested). Validated before use."""
    base = {"seed": 0, "data": {"synthetic": vars(TINY_DATA)}, "teacher": toy_section(),
            "student": toy_section(), "tracking": {"enabled": False}}
    path.write_text(yaml.safe_dump(merge(base, sections)))
    load_params(path)
    return path


def assert_kd_reaches_student_features_only(distiller: torch.nn.Module,
                                            kd: torch.Tensor) -> None:
    """A distillation term alone (``kd``) gives the student's first conv a non-zero gradient
    and its detection head none: a method that detached the student's maps
    would pass a check on the total loss, whose detection part reaches every weight anyway."""
    student = distiller.student
    first, head = student.backbone.body.conv1.weight, next(student.head.parameters())
    g_first, g_head = torch.autograd.grad(kd, [first, head], retain_graph=True, allow_unused=True)
    assert g_first is not None and g_first.abs().sum() > 0
    assert g_head is None


def toy_teacher(data_dir: Path, path: Path, category_offset: int = 0) -> Path:
    """A random toy teacher checkpoint for ``data_dir``'s categories (ids shifted by the
    offset), as stages.train writes one."""
    data = CocoDetection(data_dir / "train.json")
    ids = [i + category_offset for i in data.category_ids]
    model = build_detector(toy_model(), data.num_classes)
    save_atomic(model_checkpoint(model, toy_model(), ids, data.category_names), path)
    return path


def detecting(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (an untrained toy detector) made to detect: its classification bias raised so
    that every anchor / proposal scores well above ``score_thresh`` (an untrained detector
    gives no detections above it, and a check over its detections would check nothing).
    RetinaNet / FCOS: every class logit +2 (sigmoid 0.88); Faster R-CNN: every foreground
    class +2 and the background -2 (softmax)."""
    with torch.no_grad():
        if hasattr(model, "roi_heads"):
            bias = model.roi_heads.box_predictor.cls_score.bias
            bias.fill_(2.0)
            bias[0] = -2.0
        else:
            model.head.classification_head.cls_logits.bias.fill_(2.0)
    return model


STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


def fake_metrics(ap: float, aps: float = -1.0) -> dict[str, Any]:
    """An ``eval/NAME/metrics.json`` as stages.evaluate writes it: every COCO number ``ap``
    but APs (``aps``; -1: no small ground truth), one class, 1000 parameters."""
    return {**{k: ap for k in STAT_KEYS}, "APs": aps, "per_class_AP": {"circle": ap},
            "parameters": 1000, "inference_ms_per_image": 2.0}


@pytest.fixture
def saved_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Figure]:
    """Every matplotlib figure the code under test saves (drkd.plots.save_figure, the one PNG
    writer), by file name; the PNGs are still written. A test inspects the axes, not the bytes."""
    from drkd import leaderboard, plots, relations_plot, tuning

    figures: dict[str, Figure] = {}
    write = plots.save_figure

    def record(fig: Figure, path: Path) -> None:
        figures[Path(path).name] = fig
        write(fig, path)

    for module in (plots, relations_plot, leaderboard, tuning):
        monkeypatch.setattr(module, "save_figure", record)
    return figures


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def single_process_env() -> dict[str, str]:
    """This environment without a parent torchrun's variables, on the CPU, one thread."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return env


class Clock:
    """A stand-in for a module's ``time`` (monkeypatched in): only ``advance`` moves it, so
    timed code measures exactly what a test says each call takes."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- toy distillers and their inputs (DRKD's and the peer methods' tests, the relation benchmark)

# FPN map sizes of a 64 px batch, finest first.
LEVEL_SIZES = {"retinanet": (8, 4, 2, 1, 1), "faster_rcnn": (16, 8, 4, 2, 1)}
DRKD_EMBED, DRKD_HIDDEN = 32, 8
# Raw GloRe outputs (the formulas the tests write out); standardised L_PR has its own test.
SMALL_PIXEL = PixelRelationConfig(nodes=(4,) * 5, states=(8,) * 5, standardize=False)


def drkd_config(target: str = "features", reduction: str = "mse", **kw: Any) -> DistillConfig:
    """DRKD with small relation modules, every term at weight 1; ``instance`` and ``pixel``
    override those sections, other keywords DistillConfig's fields."""
    inst: dict[str, Any] = dict(embed_dim=DRKD_EMBED, filter_hidden=DRKD_HIDDEN, target=target,
                                tau=1.0, topk=0, similarity="learned")  # the paper's
    inst.update(kw.pop("instance", {}))
    weights = {"w_pr": 1.0, "w_ir": 1.0, "w_ins": 1.0, "w_mimic": 1.0}  # terms unweighted
    return DistillConfig(reduction=reduction, pixel=kw.pop("pixel", SMALL_PIXEL),
                         instance=InstanceRelationConfig(**inst), **{**weights, **kw})


def toy_distiller(cfg: DistillConfig, arch: str = "retinanet", c_s: int = 16,
                  c_t: int = 24) -> Distiller:
    """A Distiller between two random toy detectors with ``c_s`` / ``c_t`` FPN channels."""
    student = build_detector(toy_model(arch, fpn_channels=c_s), 4)  # background + 3
    teacher = build_detector(toy_model(arch, fpn_channels=c_t), 4)
    return Distiller(student, teacher, cfg)


def fpn_maps(channels: int, sizes: Sequence[int | tuple[int, int]], batch_size: int = 2,
             seed: int = 0, mean: float = 0.0, std: float = 1.0) -> list[torch.Tensor]:
    """Seeded normal maps, (batch_size, channels, h, w) per level; a size is h = w or (h, w)."""
    g = torch.Generator().manual_seed(seed)
    hws = [(s, s) if isinstance(s, int) else s for s in sizes]
    return [torch.randn(batch_size, channels, h, w, generator=g) * std + mean for h, w in hws]


def box_targets(*boxes: list[list[float]]) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
             "labels": torch.ones(len(b), dtype=torch.int64)} for b in boxes]


# The same small modules with the shipped switches (standardised L_PR, cosine relations).
SMALL_DRKD = dict(pixel=replace(SMALL_PIXEL, standardize=True),
                  instance=InstanceRelationConfig(embed_dim=DRKD_EMBED, filter_hidden=DRKD_HIDDEN))


def write_relation_models(data: Path, out: Path, **distill: Any) -> dict[str, Path]:
    """teacher.pt (24-channel FPN), student_drkd.pt (16) and the modules of a toy Distiller."""
    dataset = CocoDetection(data / "train.json")
    paths = {}
    models = {}
    for name, channels in (("teacher", 24), ("student_drkd", 16)):
        cfg = toy_model(fpn_channels=channels)
        models[name] = build_detector(cfg, dataset.num_classes)
        paths[name] = out / f"{name}.pt"
        save_atomic(model_checkpoint(models[name], cfg, dataset.category_ids,
                                     dataset.category_names), paths[name])
    distiller = Distiller(models["student_drkd"], models["teacher"],
                          DistillConfig(**SMALL_DRKD, **distill))  # type: ignore[arg-type]
    paths["modules"] = out / "drkd_modules.pt"
    save_atomic(distiller.modules_checkpoint(), paths["modules"])
    return paths


# -- the tuning tests' toy study (tests/test_tune.py, tests/test_postgres.py)

_TUNE_MODEL = {"fpn_channels": 16, "min_size": 64, "max_size": 64}
_TUNE_TRAIN = {"batch_size": 4, "warmup_steps": 2, "num_workers": 0, "log_every": 1, "amp": "off"}
TUNE_PARAMS: dict[str, Any] = {
    "seed": 0,
    "teacher": {"model": _TUNE_MODEL, "train": _TUNE_TRAIN},
    "student": {"model": _TUNE_MODEL, "train": _TUNE_TRAIN},
    "distill": {  # tiny relation modules: a trial takes about a second
        "w_pr": 1e-3,
        "w_ir": 1e-2,
        "w_ins": 1e-2,
        "pixel": {"nodes": [4] * 5, "states": [8] * 5},
        "instance": {"embed_dim": 16, "filter_hidden": 8, "tau": 1.0, "topk": 0},
    },
    "tune": {
        "study_name": "toy",
        "n_trials": 3,
        "pruner": "none",
        "epochs": 1,
        "space": {
            "w_pr": [1e-4, 1e-2],
            "w_ir": [1e-3, 1e-1],
            "w_ins": [1e-3],
            "tau": [0.5, 2.0],
            "topk": [0, 2],
            "filter_hidden": [8, 16],
            "filter": [True, False],
            "target": ["matrix", "features", "both"],
            "lr": [],
        },
    },
    "evaluate": {"batch_size": 4},
    "tracking": {"enabled": False},
}


def tune_args(params: Path, data: Path, teacher: Path, folder: Path, *extra: str) -> list[str]:
    return [
        "--params", str(params), "--data", str(data), "--teacher", str(teacher),
        "--storage", f"sqlite:///{folder / 'optuna.db'}", "--out", str(folder / "tuning"), *extra,
    ]  # fmt: skip


def dvc_stages(dvc_yaml: Path) -> dict[str, dict[str, Any]]:
    """dvc.yaml's stages by the name DVC gives them (``evaluate@teacher`` for ``foreach``),
    with ``${item}`` filled in; YAML anchors (``*train_deps``) are resolved by the loader.
    A ``matrix`` stage counts once: its code deps do not depend on the item."""
    stages: dict[str, dict[str, Any]] = {}
    for name, stage in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        if "foreach" not in stage:
            stages[name] = stage
            continue
        assert isinstance(stage["foreach"], list), f"{name}: only a list foreach is handled"
        for item in stage["foreach"]:
            text = yaml.safe_dump(stage["do"]).replace("${item}", str(item))
            stages[f"{name}@{item}"] = yaml.safe_load(text)
    return stages
