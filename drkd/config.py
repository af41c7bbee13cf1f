"""params.yaml -> frozen dataclasses, with a strict loader.

Every section of params.yaml has one frozen dataclass here. The loader refuses
unknown keys, wrong types and out-of-range values before any work starts, with
one line naming the key path: ``params.yaml: teacher.train.lr: expected a
positive float, got 'fast'``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError


class UserError(ValueError):
    """Bad input: params, presets, data, checkpoints or arguments that cannot make a run.

    Its message is one line naming the file or key; the stage scripts print it without a
    traceback (drkd.cli). Any other exception is a bug and keeps its traceback.
    """


class ConfigError(UserError):
    """A params file that does not describe a valid run (one-line message)."""


class NonFiniteLoss(RuntimeError):
    """A loss term became NaN or inf (a setting that diverges); the last good checkpoint is kept.

    Raised by drkd.engine; it lives here beside UserError so that drkd.cli can tell the two
    apart without importing the training loop (and torch) into every stage.
    """


def positive(kind: str = "number") -> dict[str, Any]:
    return {"check": lambda v: v > 0, "expect": f"a positive {kind}"}


def non_negative(kind: str = "number") -> dict[str, Any]:
    return {"check": lambda v: v >= 0, "expect": f"a non-negative {kind}"}


def name() -> dict[str, Any]:
    """A name MLflow or Optuna keys things by: not empty, no surrounding spaces."""
    return {"check": lambda v: bool(v) and v == v.strip(),
            "expect": "a non-empty name without surrounding spaces"}


def fraction() -> dict[str, Any]:
    return {"check": lambda v: 0 <= v <= 1, "expect": "a float in [0, 1]"}


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded shapes dataset (see drkd/data/synthetic.py)."""

    num_train: int = field(default=2000, metadata=positive("int"))
    num_val: int = field(default=300, metadata=positive("int"))
    image_size: int = field(default=128, metadata=positive("int"))
    min_objects: int = field(default=3, metadata=positive("int"))
    max_objects: int = field(default=8, metadata=positive("int"))
    min_object_size: int = field(default=10, metadata=positive("int"))
    max_object_size: int = field(default=110, metadata=positive("int"))
    distractors: int = field(default=6, metadata=non_negative("int"))


@dataclass(frozen=True)
class CocoConfig:
    """Any COCO-format dataset on local disk; paths may be relative to the repo root."""

    train_annotations: str = ""
    train_images: str = ""
    val_annotations: str = ""
    val_images: str = ""
    max_images: int = field(default=0, metadata=non_negative("int"))  # per split, 0 = all


@dataclass(frozen=True)
class VocConfig:
    """A Pascal VOC-style dataset on local disk (see drkd/data/voc.py): ``root`` holds
    Annotations/*.xml, JPEGImages/ and ImageSets/Main/<split>.txt; it may be relative to the
    repo root."""

    root: str = ""
    train_split: str = "train"  # ImageSets/Main/<train_split>.txt lists the training images
    val_split: str = "val"
    # Category ids 1..K in this order; empty: every class name in the two splits' XMLs, sorted.
    classes: tuple[str, ...] = ()
    ignore_unknown_classes: bool = False  # true: skip (and count) objects of other classes
    max_images: int = field(default=0, metadata=non_negative("int"))  # per split, 0 = all


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "coco", "voc"] = "synthetic"
    synthetic: SyntheticConfig = SyntheticConfig()
    coco: CocoConfig = CocoConfig()
    voc: VocConfig = VocConfig()


@dataclass(frozen=True)
class ModelConfig:
    """One torchvision detector (see drkd/models.py)."""

    arch: Literal["retinanet", "faster_rcnn", "fcos"] = "retinanet"
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large"] = (
        "resnet18"
    )
    fpn_channels: int = field(default=64, metadata=positive("int"))
    min_size: int = field(default=128, metadata=positive("int"))
    max_size: int = field(default=128, metadata=positive("int"))
    # Smallest anchor (px) at the finest level; doubles per level.
    anchor_size: int = field(default=8, metadata=positive("int"))
    head_convs: int = field(default=2, metadata=positive("int"))  # retinanet / fcos head depth
    norm: Literal["batch", "group", "frozen"] = "batch"  # frozen only for pretrained backbones
    weights: str = ""  # local torchvision detector state_dict to start from
    backbone_weights: str = ""  # local ImageNet classifier state_dict for the backbone
    rpn_pre_nms_top_n: int = field(default=500, metadata=positive("int"))
    rpn_post_nms_top_n: int = field(default=250, metadata=positive("int"))
    roi_batch_size: int = field(default=128, metadata=positive("int"))
    score_thresh: float = field(default=0.05, metadata=fraction())
    detections_per_img: int = field(default=100, metadata=positive("int"))


@dataclass(frozen=True)
class TrainConfig:
    """The shared training loop (see drkd/engine.py)."""

    epochs: int = field(default=12, metadata=non_negative("int"))  # 0: keep the given weights
    batch_size: int = field(default=8, metadata=positive("int"))
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = field(default=1e-3, metadata=positive("float"))
    momentum: float = field(default=0.9, metadata=fraction())
    weight_decay: float = field(default=1e-4, metadata=non_negative("float"))
    warmup_steps: int = field(default=300, metadata=non_negative("int"))
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: tuple[float, ...] = ()  # epochs at which the step schedule multiplies by gamma
    gamma: float = field(default=0.1, metadata=positive("float"))
    clip_grad_norm: float = field(default=10.0, metadata=non_negative("float"))  # 0 = off
    amp: Literal["off", "bf16", "fp16"] = "bf16"  # CUDA only; ignored on CPU
    hflip: float = field(default=0.5, metadata=fraction())
    num_workers: int = field(default=1, metadata=non_negative("int"))
    max_steps: int = field(default=0, metadata=non_negative("int"))  # 0 = no cap (smoke runs)
    log_every: int = field(default=10, metadata=positive("int"))  # steps per logged loss mean


@dataclass(frozen=True)
class DetectorConfig:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()


@dataclass(frozen=True)
class PixelRelationConfig:
    """GloRe sizes per FPN level, finest first (release: N=64, S=128 on the two finest)."""

    nodes: tuple[int, ...] = field(default=(64, 32, 16, 8, 4), metadata=positive("int"))
    states: tuple[int, ...] = field(default=(128, 64, 64, 32, 32), metadata=positive("int"))
    # True: the teacher's GloRe units stay as initialised, so the KD loss cannot move the
    # target (needs identity_start False: a frozen identity unit would make the target the raw
    # map); trained (the release) they drift toward the student's output.
    freeze_teacher: bool = False
    # True: both sides' GloRe outputs standardised per channel (over batch and pixels) before
    # the distance, as PKD does to maps, so L_PR is blind to the teacher's feature scale
    # (teacher maps have RMS ~17). Changes the scale of L_PR: retune w_pr.
    # `release: true` implies False.
    standardize: bool = True
    # True: each unit's output BatchNorm starts at weight 0, so GloRe starts as the identity and
    # L_PR as plain feature imitation; False: weight 1 (the release), relations from step 0.
    # `release: true` implies False.
    identity_start: bool = True


@dataclass(frozen=True)
class InstanceRelationConfig:
    levels: int = field(default=2, metadata=positive("int"))  # finest levels pooled by RoIAlign
    embed_dim: int = field(default=256, metadata=positive("int"))
    # matrix (the default, from the ablation in docs/results.md): L_IR matches the matrices
    # only, a target INS does not already give; features: the refined features z (z = e at
    # init, so L_IR starts as a second L_INS).
    target: Literal["matrix", "features", "both"] = "matrix"
    # learned: a_ij = <theta e_i, phi e_j> / sqrt(d) (the paper; the teacher's theta/phi stay
    # as initialised); cosine: a_ij = cos(e_i, e_j) on both sides, parameter-free, so the
    # teacher's relations are its own features' geometry (set tau for logits in [-1, 1]).
    similarity: Literal["learned", "cosine"] = "cosine"
    tau: float = field(default=0.1, metadata=positive("float"))
    topk: int = field(default=4, metadata=non_negative("int"))  # 0 = keep all relations
    filter: bool = True
    filter_hidden: int = field(default=128, metadata=positive("int"))


def method_names(*extra: str, tunable: bool = False) -> tuple[str, ...]:
    """The registered methods (drkd.registry; ``tunable``: those with a search space) and
    ``extra`` names (e.g. none, "")."""
    from drkd import registry  # it imports this module's validators

    return (*extra, *(registry.tunable() if tunable else registry.names()))


def _method_name(*extra: str, tunable: bool = False) -> dict[str, Any]:
    def names() -> tuple[str, ...]:
        return method_names(*extra, tunable=tunable)

    return {"check": lambda v: v in names(),
            "expect": lambda: "one of " + ", ".join(map(repr, names()))}


def _sections(kind: str) -> Any:
    """A field holding the registered methods' sections (drkd.registry.sections)."""
    def defaults() -> dict[str, Any]:
        from drkd import registry

        return {name: cls() for name, cls in registry.sections(kind).items()}

    # hash=False: a dict is unhashable, and the config stays usable as a key without it.
    return field(default_factory=defaults, metadata={"sections": kind}, hash=False)


@dataclass(frozen=True)
class DistillConfig:
    """Distillation of the student (trained with the `student` section's recipe).

    method: drkd (pixel + instance relations, method.md; weights w_pr/w_ir/w_ins and the
    pixel/instance sections) | mimic (adapter + MSE on every FPN level, w_mimic) | pkd | cwd |
    mgd | fgd (the peer methods, each with its own section) | none. A weight of 0 switches a
    term off (its modules are not built).
    """

    method: str = field(default="drkd", metadata=_method_name("none"))
    # The terms of these methods too, each with its own weights from this section: e.g. MGD's
    # generation loss plus DRKD's relation-only L_IR is `method: mgd, plus: [drkd], w_pr: 0,
    # w_ins: 0` (a compare row on top of the strongest feature loss).
    plus: tuple[str, ...] = ()
    # Start the student's neck (FPN) and head from the teacher's weights, as the official FGD
    # and MGD configs do (`init_student`); needs equal FPN widths and heads (R101 -> R50).
    init_student: bool = False
    reduction: Literal["norm", "mse"] = "mse"
    # DRKD as the authors' release computes it, for every difference the README's table lists:
    # GloRe without /HW (BN eps 1e-4, weight 1), RoIAlign aligned=False with adaptive
    # sampling, relation embeddings of D/2 without 1/sqrt(d) and W not zero-initialised, the
    # student's IR features adapted after its relation block by an adapter of their own, the
    # teacher's embeddings trained. The relation filter stays ours (the release's is a fresh
    # random layer every step).
    release: bool = False
    # w_ins: the best of the 20-trial study at the tuning budget (README, "Tuning"), for `mse`.
    # w_pr: for standardised L_PR (~9.6 unweighted at the start, so ~1/10 of weighted L_INS);
    # the study's 4.3e-3 on raw maps cost 3.4 AP at 4 epochs. w_ir: for the relation-only
    # target (instance: matrix, cosine, tau 0.1); at 20 it swamps detection (docs/results.md).
    w_pr: float = field(default=0.06, metadata=non_negative("float"))
    w_ir: float = field(default=1.0, metadata=non_negative("float"))
    w_ins: float = field(default=0.07614447586077995, metadata=non_negative("float"))
    w_mimic: float = field(default=0.001, metadata=non_negative("float"))
    pixel: PixelRelationConfig = PixelRelationConfig()
    instance: InstanceRelationConfig = InstanceRelationConfig()
    # The other methods' sections, `distill.<method>` in params.yaml (e.g. `cfg.mgd`): one per
    # registered method with a config (drkd.registry).
    sections: dict[str, Any] = _sections("config")

    def __post_init__(self) -> None:  # sections given in part: the others at their defaults
        from drkd import registry

        missing = {n: c() for n, c in registry.sections("config").items()
                   if n not in self.sections}
        if missing:
            object.__setattr__(self, "sections", {**self.sections, **missing})

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"DistillConfig has no {name!r}")


@dataclass(frozen=True)
class SearchSpace:
    """Optuna search space over `distill`. Ranges [low, high] are log-uniform; lists of choices
    are categorical; one value fixes a dimension; [] leaves it out (the `distill` value holds)."""

    w_pr: tuple[float, ...] = (6e-3, 2.0)
    w_ir: tuple[float, ...] = (0.1, 150.0)
    w_ins: tuple[float, ...] = (1e-3, 0.25)
    tau: tuple[float, ...] = (0.03, 1.0)  # cosine logits lie in [-1, 1]
    topk: tuple[int, ...] = (0, 2, 4)
    filter_hidden: tuple[int, ...] = (32, 64, 128, 256)
    filter: tuple[bool, ...] = (True, False)
    # Off: the default `matrix` target holds (`features` at w_ir >= 0.1 is a heavy second INS).
    target: tuple[Literal["matrix", "features", "both"], ...] = ()
    lr: tuple[float, ...] = ()


@dataclass(frozen=True)
class TuneConfig:
    """`tune` (not run by plain `dvc repro`): a study whose objective is the validation AP of
    the distilled student after a short budget."""

    study_name: str = field(default="drkd", metadata=name())
    storage: str = ""  # any Optuna RDB URL; empty: sqlite:///optuna.db in the repo root
    n_trials: int = field(default=20, metadata=positive("int"))  # in total, over all workers
    sampler_seed: int = field(default=0, metadata=non_negative("int"))
    pruner: Literal["median", "hyperband", "none"] = "median"
    # A RUNNING trial whose worker has not refreshed its heartbeat (every grace_s / 6) for this
    # long belongs to a dead worker and is failed, so the study goes on without it.
    grace_s: int = field(default=60, metadata={
        "check": lambda v: v >= 3, "expect": "an int >= 3 (3 heartbeats at the least)"})
    epochs: int = field(default=2, metadata=positive("int"))  # per trial
    max_steps: int = field(default=0, metadata=non_negative("int"))  # per trial; 0 = no cap
    # The method tuned: empty for distill.method (`make tune TUNE_ARGS="--method pkd"` too).
    method: str = field(default="", metadata=_method_name("", tunable=True))
    space: SearchSpace = SearchSpace()  # DRKD's
    # The other methods' spaces over their own `distill` keys (`tune.spaces.<method>`, read
    # like `space`): one per registered method with a space (drkd.registry).
    spaces: dict[str, Any] = _sections("space")


@dataclass(frozen=True)
class CompareConfig:
    """`make compare` (compare/dvc.yaml): every row x every seed, each a cached DVC stage. A row
    is a name and its overrides of `distill` (``row_distill``): a method as params.yaml sets it
    (``pkd: {}``), or a variant of one (an ablation: ``drkd_ins: {method: drkd, w_pr: 0}``)."""

    methods: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        m: {} for m in method_names("none")})
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = field(default=0, metadata=non_negative("int"))  # 0: the student recipe's


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = field(default=16, metadata=positive("int"))
    num_vis_images: int = field(default=4, metadata=non_negative("int"))
    vis_score_thresh: float = field(default=0.3, metadata=fraction())
    timing_images: int = field(default=20, metadata=non_negative("int"))


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    experiment: str = field(default="drkd", metadata=name())
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the repo root
    # CPU, memory, disk (and GPU with nvidia-ml-py installed) of the training stages, sampled by
    # MLflow every 10 s ($MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) as system/* metrics.
    system_metrics: bool = True
    # The Model Registry name of the distilled student: each `distill` run registers a new
    # version and points the alias `candidate` at it (models:/<name>@candidate); "" = off.
    registered_model: str = "drkd-student"


@dataclass(frozen=True)
class Params:
    seed: int = field(default=0, metadata=non_negative("int"))
    # How dvc.yaml launches the training stages: `python`, or e.g.
    # `torchrun --nproc_per_node=8` for DDP on a multi-GPU machine.
    launcher: str = field(default="python", metadata={
        "check": lambda v: bool(v.split()), "expect": "a command such as python or torchrun ..."})
    data: DataConfig = DataConfig()
    teacher: DetectorConfig = DetectorConfig(ModelConfig(fpn_channels=128), TrainConfig(epochs=20))
    student: DetectorConfig = DetectorConfig(ModelConfig(fpn_channels=64), TrainConfig(epochs=8))
    distill: DistillConfig = field(default_factory=DistillConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0]).split(' ', 1)[-1]}s"
    return {bool: "a boolean", int: "an int", float: "a float", str: "a string"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, where: str, meta: typing.Mapping[str, Any]) -> Any:
    def fail(expect: str, given: Any = value) -> typing.NoReturn:  # as written, not converted
        raise ConfigError(f"{where}: expected {expect}, got {given!r}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail("a mapping")
        return _build(typing.cast(type, tp), value, where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            fail(_describe(tp))
        return value
    if origin is dict:  # str keys; values converted unless typed Any (checked by the caller)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            fail("a mapping")
        item = typing.get_args(tp)[1]
        return {k: v if item is Any else _convert(item, v, f"{where}.{k}", {})
                for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            fail(_describe(tp))
        item = typing.get_args(tp)[0]  # a tuple field's metadata checks each of its items
        return tuple(_convert(item, v, f"{where}[{i}]", meta) for i, v in enumerate(value))
    expect = meta.get("expect", _describe(tp))
    expect = expect() if callable(expect) else expect
    if tp is bool:
        if not isinstance(value, bool):
            fail(expect)
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(expect)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail(expect)
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            fail(expect)
    if "check" in meta and not meta["check"](value):
        fail(expect)
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    # The registered methods' sections: `distill.<method>` sit beside distill's own keys,
    # `tune.spaces` holds only them.
    inline = next((f for f in names.values() if f.metadata.get("sections") == "config"), None)
    section_data = {}
    if inline:
        section_data = {k: data[k] for k in data if k in _section_classes("config")}
        data = {k: v for k, v in data.items() if k not in section_data}
    for key in data:
        if key not in names or key == getattr(inline, "name", None):
            known = [n for n in names if names[n] is not inline]
            known += list(_section_classes("config")) if inline else []
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(known)})".lstrip("."))
    kwargs = {
        key: _build_sections(names[key].metadata["sections"], value, f"{where}.{key}".lstrip("."))
        if "sections" in names[key].metadata
        else _convert(hints[key], value, f"{where}.{key}" if where else key, names[key].metadata)
        for key, value in data.items()
    }
    if inline:
        kwargs[inline.name] = _build_sections("config", section_data, where)
    return cls(**kwargs)


def _section_classes(kind: str) -> dict[str, type]:
    from drkd import registry

    return registry.sections(kind)


def _build_sections(kind: str, data: Any, where: str) -> dict[str, Any]:
    """Every registered method's section of ``kind`` (drkd.registry.sections): from ``data``
    where it gives one, else its defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    classes = _section_classes(kind)
    for key in data:
        if key not in classes:
            raise ConfigError(f"{where}.{key}: unknown method (known: {', '.join(classes)})")
    return {name: _convert(cls, data[name], f"{where}.{name}".lstrip("."), {})
            if name in data else cls() for name, cls in classes.items()}


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Strictly build one section's dataclass from a mapping (e.g. a checkpoint's config)."""
    return typing.cast(T, _build(cls, data, where))


def row_distill(distill: dict[str, Any], name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The `distill` section a `compare.methods` row trains with: ``distill`` (params.yaml's)
    with the row's overrides on top; the method is the row's name unless they name one."""
    return merge(distill, {"method": name, **overrides})


def method_distill(distill: dict[str, Any]) -> dict[str, Any]:
    """The part of a `distill` section (plain dicts) that its methods read: `method`, `plus`
    when it names any, `init_student` when on (not for `none`: the baseline trains without a
    teacher), and the keys each method reads (drkd.registry)."""
    from drkd import registry

    plus = list(distill.get("plus", ()))
    keys = ["method", *(["plus"] if plus else []),
            *(["init_student"] if distill.get("init_student") and distill["method"] != "none"
              else [])]
    for method in (distill["method"], *plus):
        if method != "none":
            keys += [k for k in registry.METHODS[method].reads() if k not in keys]
    return {k: distill[k] for k in keys}


def _check_distill(distill: DistillConfig, where: str) -> None:
    if distill.instance.topk == 1:  # one partner a row: both relation matrices are one-hot
        raise ConfigError(f"{where}.instance.topk: 1 makes every relation row one-hot on both "
                          "sides, so L_IR is 0; use 0 (all partners) or 2 or more")
    if distill.plus and distill.method == "none":
        raise ConfigError(f"{where}.plus: needs a method to add to (method is none)")
    for i, name in enumerate(distill.plus):
        if name not in method_names():
            raise ConfigError(f"{where}.plus[{i}]: expected one of "
                              f"{', '.join(map(repr, method_names()))}, got {name!r}")
        if name == distill.method or name in distill.plus[:i]:
            raise ConfigError(f"{where}.plus[{i}]: {name} is already among the methods")


def _check_rows(params: Params) -> None:
    """Every `compare.methods` row (a mapping, checked by _convert): a name DVC stages and
    files can carry, and a valid `distill` section once its overrides are applied."""
    distill = to_dict(params.distill)
    for name, overrides in params.compare.methods.items():
        where = f"compare.methods.{name}"
        if not name or not all(c.isalnum() or c == "_" for c in name):
            raise ConfigError(f"{where}: a row name is letters, digits and _ (it names DVC "
                              "stages and files)")
        if "method" not in overrides and name not in method_names("none"):
            raise ConfigError(f"{where}: not a method name, so its overrides need `method`")
        _check_distill(_build(DistillConfig, row_distill(distill, name, overrides), where), where)


def _check_whole(params: Params) -> None:
    _check_distill(params.distill, "distill")
    _check_rows(params)
    s = params.data.synthetic
    if s.min_objects > s.max_objects:
        raise ConfigError("data.synthetic.min_objects: must not exceed max_objects")
    if s.min_object_size > s.max_object_size:
        raise ConfigError("data.synthetic.min_object_size: must not exceed max_object_size")
    if s.max_object_size > s.image_size:
        raise ConfigError("data.synthetic.max_object_size: must not exceed image_size")
    for name in ("teacher", "student"):
        model = getattr(params, name).model
        if model.min_size > model.max_size:
            raise ConfigError(f"{name}.model.min_size: must not exceed max_size")
    space = params.tune.space
    hints = typing.get_type_hints(SearchSpace)  # the float dimensions: log ranges or a value
    for name in (f.name for f in dataclasses.fields(space) if hints[f.name] == tuple[float, ...]):
        values = getattr(space, name)
        if (
            len(values) > 2
            or any(v <= 0 for v in values)
            or (len(values) == 2 and values[0] > values[1])
        ):
            raise ConfigError(
                f"tune.space.{name}: expected [], [value] or [low, high] with "
                f"0 < low <= high, got {list(values)}"
            )
    for method, method_space in params.tune.spaces.items():
        for dim in dataclasses.fields(method_space):
            values = getattr(method_space, dim.name)
            if any(v <= 0 for v in values) or (len(values) == 2 and values[0] > values[1]):
                raise ConfigError(
                    f"tune.spaces.{method}.{dim.name}: expected positive values, "
                    f"[low, high] with low <= high, got {list(values)}"
                )
    if params.data.source == "coco":
        for key in ("train_annotations", "train_images", "val_annotations", "val_images"):
            if not getattr(params.data.coco, key):
                raise ConfigError(f"data.coco.{key}: required when data.source is 'coco'")
    voc = params.data.voc
    if params.data.source == "voc":
        for key in ("root", "train_split", "val_split"):
            if not getattr(voc, key):
                raise ConfigError(f"data.voc.{key}: required when data.source is 'voc'")
    for i, name in enumerate(voc.classes):
        if not name.strip() or name != name.strip():
            raise ConfigError(
                f"data.voc.classes[{i}]: expected a non-empty name without surrounding spaces, "
                f"got {name!r}"
            )
        if name in voc.classes[:i]:
            raise ConfigError(f"data.voc.classes[{i}]: duplicate class {name!r}")


def parse_params(data: Any) -> Params:
    """Build Params from an already-parsed mapping; raises ConfigError (without file name)."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, got {type(data).__name__}")
    params = typing.cast(Params, _build(Params, data, ""))
    _check_whole(params)
    return params


def read_yaml(text: str) -> Any:
    """YAML 1.2 (ruamel): 1e-05 is a float, as DVC and JSON write it (PyYAML's 1.1 reads a
    string)."""
    return YAML(typ="safe", pure=True).load(text)


def read_yaml_file(path: str | Path) -> Any:
    """``read_yaml`` of a file (params, preset, best params); an unreadable file or invalid
    YAML is one ConfigError line naming the file."""
    path = Path(path)
    try:
        return read_yaml(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    except YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; any problem is one ConfigError line naming the file."""
    path = Path(path)
    data = read_yaml_file(path)
    try:
        return parse_params(data or {})
    except ConfigError as err:
        raise ConfigError(f"{path.name}: {err}") from None


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` (a partial params mapping, e.g. a preset) applied onto ``base``, nested
    mappings merged key by key."""
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain dicts/lists (for checkpoints and logging); the methods' `distill`
    sections sit beside distill's own keys, as in params.yaml."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            out: dict[str, Any] = {}
            for f in dataclasses.fields(v):
                value = plain(getattr(v, f.name))
                if f.metadata.get("sections") == "config":
                    out.update(value)
                else:
                    out[f.name] = value
            return out
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return typing.cast(dict[str, Any], plain(obj))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
