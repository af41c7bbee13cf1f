"""The distillation methods, each registered once: what builds it, its `distill` section and
search space, the loss terms it returns and the `distill` keys it reads.

Everything else is derived from here: the names `distill.method`, `distill.plus` and
`tune.method` accept, `python -m stages.tune --method` choices, the default compare rows, the
terms the loss plot and the calibration show, and what a compare cell depends on
(``keys``). Torch-free (the config loader uses it): a method's module is named by its import
path and imported when a run builds it.

Adding a method is one ``register`` call (README, "Adding a method or a detector")::

    register(MethodSpec("mymethod", "my_pkg.my_method:MyMethod",
                        terms={"loss_mine": "weight"}, config=MyConfig, space=MySpace))

with ``MyMethod(cfg, levels, c_s, c_t)`` an ``nn.Module`` whose ``forward(student_maps,
teacher_maps, targets, batch_shape)`` returns its weighted terms (drkd/methods/__init__.py),
``MyConfig`` a frozen dataclass read from `distill.mymethod` and ``MySpace`` one of tuples
read from `tune.spaces.mymethod`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from drkd.config import fraction, non_negative, positive


@dataclass(frozen=True)
class MethodSpec:
    """One method. ``terms``: each loss term it returns -> the search dimension (a weight) it
    is linear in, "" for an unweighted term. ``keys``: the `distill` keys it reads besides
    `method` and `plus` (default: its own section). ``config``: the dataclass of its section
    `distill.<name>`; ``space``: of `tune.spaces.<name>` ([low, high] log ranges or choices).
    ``param_path``: where a search dimension lives in params.yaml (default
    `distill.<name>.<dim>`)."""

    name: str
    module: str | Callable[..., Any]  # "package.module:Class" or the class itself
    terms: dict[str, str]
    keys: tuple[str, ...] = ()
    config: type | None = None
    space: type | None = None
    param_path: Callable[[str], str] | None = None

    def path(self, dim: str) -> str:
        return self.param_path(dim) if self.param_path else f"distill.{self.name}.{dim}"

    def reads(self) -> tuple[str, ...]:
        return self.keys or ((self.name,) if self.config else ())


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method: a name of letters, digits and _ that is neither `none`, nor taken, nor a
    key of `distill` (its section sits beside them); a search space needs a place in params
    for its dimensions (a config section, or ``param_path``)."""
    from dataclasses import fields

    from drkd.config import DistillConfig

    if not spec.name.isidentifier() or spec.name == "none":
        raise ValueError(f"method name {spec.name!r}: not an identifier, or `none`")
    if spec.name in METHODS or spec.name in {f.name for f in fields(DistillConfig)}:
        raise ValueError(f"method name {spec.name!r}: taken (a method or a `distill` key)")
    if spec.space is not None and spec.config is None and spec.param_path is None:
        raise ValueError(f"method {spec.name!r}: a space needs a config or a param_path")
    # Combined rows (`plus`) sum every method's terms into one dict: a name twice would clash.
    taken = {term: m.name for m in METHODS.values() for term in m.terms}
    clash = next((term for term in spec.terms if term in taken), None)
    if clash:
        raise ValueError(f"method {spec.name!r}: loss term {clash!r} is {taken[clash]}'s")
    METHODS[spec.name] = spec
    return spec


def names() -> tuple[str, ...]:
    """Every registered method, in registration order (`none`, the baseline, is not one)."""
    return tuple(METHODS)


def tunable() -> tuple[str, ...]:
    """The methods with a search space (DRKD's is `tune.space`, the others' their own)."""
    return tuple(n for n, spec in METHODS.items() if n == "drkd" or spec.space is not None)


def build_module(name: str) -> Callable[..., Any]:
    module = METHODS[name].module
    if callable(module):
        return module
    path, attr = module.split(":")
    return getattr(importlib.import_module(path), attr)  # type: ignore[no-any-return]


def sections(kind: str) -> dict[str, type]:
    """Method name -> the dataclass of its `distill.<name>` section (``kind`` "config") or of
    its `tune.spaces.<name>` space ("space")."""
    return {name: getattr(spec, kind) for name, spec in METHODS.items()
            if getattr(spec, kind) is not None}


def loss_terms() -> tuple[str, ...]:
    """Every registered method's loss terms, in registration order."""
    return tuple(term for spec in METHODS.values() for term in spec.terms)


# -- the built-in methods ----------------------------------------------------------------------


@dataclass(frozen=True)
class PkdConfig:
    """PKD (Cao et al. 2022): MSE of per-channel standardised FPN maps, halved (mmrazor's
    configs: weight 10 for RetinaNet, 6 for Faster R-CNN)."""

    weight: float = field(default=10.0, metadata=non_negative("float"))


@dataclass(frozen=True)
class CwdConfig:
    """CWD (Shu et al. 2021): per-channel spatial softmax, KL(teacher || student) * tau^2."""

    weight: float = field(default=10.0, metadata=non_negative("float"))
    tau: float = field(default=1.0, metadata=positive("float"))


@dataclass(frozen=True)
class MgdConfig:
    """MGD (Yang et al. 2022): mask student pixels, generate the teacher map from the rest."""

    weight: float = field(default=2e-5, metadata=non_negative("float"))  # alpha_mgd
    mask_ratio: float = field(default=0.65, metadata=fraction())  # lambda_mgd


@dataclass(frozen=True)
class FgdConfig:
    """FGD (Yang et al. 2022): focal (fg/bg) imitation under the teacher's attention, attention
    imitation and a global (GcBlock) relation loss. Defaults: the RetinaNet configs."""

    temperature: float = field(default=0.5, metadata=positive("float"))
    alpha: float = field(default=1e-3, metadata=non_negative("float"))  # foreground
    beta: float = field(default=5e-4, metadata=non_negative("float"))  # background
    gamma: float = field(default=5e-4, metadata=non_negative("float"))  # attention
    lam: float = field(default=5e-6, metadata=non_negative("float"))  # global relation


@dataclass(frozen=True)
class MimicSpace:
    w_mimic: tuple[float, ...] = (1e-4, 1e-1)


@dataclass(frozen=True)
class PkdSpace:
    weight: tuple[float, ...] = (0.04, 30.0)


@dataclass(frozen=True)
class CwdSpace:
    weight: tuple[float, ...] = (0.015, 30.0)
    tau: tuple[float, ...] = (0.5, 4.0)


@dataclass(frozen=True)
class MgdSpace:
    weight: tuple[float, ...] = (8e-8, 2e-4)
    # A log range: each 20-trial study so far put its best at the smallest choice offered.
    mask_ratio: tuple[float, ...] = (0.02, 0.85)


@dataclass(frozen=True)
class FgdSpace:
    # Wider than the paper's neighbourhood: T 0.5 presumes mmdet's FPN scale; on the embedded
    # teacher (mean |F| 3-24) it puts the attention on one channel and the fg term starts at
    # ~2000x the detection loss at the paper's alpha (`stages.tune --calibrate`): T reaches 16x
    # the paper's, alpha down to where that term is 0.1x the detection loss.
    temperature: tuple[float, ...] = (0.5, 8.0)
    alpha: tuple[float, ...] = (5e-8, 1e-2)
    beta: tuple[float, ...] = (5e-6, 5e-3)
    gamma: tuple[float, ...] = (5e-6, 1.2e-2)
    lam: tuple[float, ...] = (5e-8, 5e-5)


DRKD_TOP_LEVEL = ("w_pr", "w_ir", "w_ins")  # distill.<dim>; lr: the student's; rest: instance


def _drkd_path(dim: str) -> str:
    if dim == "lr":
        return "student.train.lr"
    return f"distill.{dim}" if dim in DRKD_TOP_LEVEL else f"distill.instance.{dim}"


# DRKD's settings are `distill`'s own keys (drkd.config.DistillConfig) and its space is
# `tune.space` (drkd.config.SearchSpace), where they were before the other methods came.
register(MethodSpec(
    "drkd", "drkd.methods.drkd:DRKD",
    terms={"loss_pr": "w_pr", "loss_ir": "w_ir", "loss_ins": "w_ins", "loss_filter": ""},
    keys=("reduction", "release", "w_pr", "w_ir", "w_ins", "pixel", "instance"),
    param_path=_drkd_path))
register(MethodSpec(
    "mimic", "drkd.methods.mimic:Mimic", terms={"loss_mimic": "w_mimic"},
    keys=("reduction", "w_mimic"), space=MimicSpace, param_path=lambda dim: f"distill.{dim}"))
register(MethodSpec("pkd", "drkd.methods.pkd:PKD", terms={"loss_pkd": "weight"},
                    config=PkdConfig, space=PkdSpace))
register(MethodSpec("cwd", "drkd.methods.cwd:CWD", terms={"loss_cwd": "weight"},
                    config=CwdConfig, space=CwdSpace))
register(MethodSpec("mgd", "drkd.methods.mgd:MGD", terms={"loss_mgd": "weight"},
                    config=MgdConfig, space=MgdSpace))
register(MethodSpec(
    "fgd", "drkd.methods.fgd:FGD",
    terms={"loss_fgd_fg": "alpha", "loss_fgd_bg": "beta", "loss_fgd_att": "gamma",
           "loss_fgd_global": "lam"},
    config=FgdConfig, space=FgdSpace))
