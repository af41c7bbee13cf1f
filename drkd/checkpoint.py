"""Checkpoints: written atomically (temp file + rename), read with ``weights_only=True``.

A model checkpoint carries what is needed to rebuild the detector without
params.yaml: ``{"model": state_dict, "model_config": dict, "num_classes": int,
"category_ids": [...], "category_names": [...]}``. ``code_digest`` fingerprints the code a
resumable training state was written by.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from drkd.config import ModelConfig, UserError, from_dict, to_dict
from drkd.files import atomic_path
from drkd.models import build_detector

REPO = Path(__file__).resolve().parents[1]


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, then rename: readers never see half a file.

    Saved through a file object: given a path, torch.save names the zip's root folder after the
    (random) temp file, so equal weights gave different bytes, a new DVC hash and a new
    compare_id on every re-save."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        torch.save(obj, file)


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable checkpoint ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a drkd checkpoint (top level is {type(state).__name__})")
    return state


def model_checkpoint(
    model: nn.Module, cfg: ModelConfig, category_ids: list[int], category_names: list[str]
) -> dict[str, Any]:
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": to_dict(cfg),
        "num_classes": len(category_ids) + 1,
        "category_ids": list(category_ids),
        "category_names": list(category_names),
    }


def model_card(state: dict[str, Any]) -> dict[str, Any]:
    """A model checkpoint without its weights (builder config, classes): what MLflow shows
    beside the logged model."""
    return {k: v for k, v in state.items() if k != "model"}


def load_detector(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a plain torchvision detector from a model checkpoint; returns (model, checkpoint).

    Leaves the global RNG where it was."""
    state = load(path)
    for key in ("model", "model_config", "num_classes", "category_ids", "category_names"):
        if key not in state:
            raise UserError(f"{path}: not a model checkpoint (no '{key}')")
    cfg = from_dict(
        ModelConfig, dict(state["model_config"], weights="", backbone_weights=""), "model_config"
    )
    # The random init is overwritten by the saved weights: drawn from a forked RNG, it does not
    # move the caller's seeded stream (the distill stage loads its teacher after seeding).
    with torch.random.fork_rng(devices=[]):
        model = build_detector(cfg, int(state["num_classes"]))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:  # torch lists every mismatch; its first line says which kind
        first = str(err).splitlines()[0].rstrip(":")
        raise UserError(f"{path}: weights do not fit its model_config ({first})") from None
    return model, state


def code_digest(root: Path = REPO) -> str:
    """sha256 of the source files this process has imported from ``root/drkd`` and
    ``root/stages`` (each file's path and content, in path order).

    Part of the resume fingerprint of a training stage: a run killed under one version of
    the code is never continued under another. Only loaded modules count, so editing the
    report does not discard a training run's progress. The two packages are named, not the
    whole repository, because the virtual environment and the tests may live inside it.
    """
    packages = (root / "drkd", root / "stages")
    files = {
        Path(file).resolve()
        for module in list(sys.modules.values())
        if (file := getattr(module, "__file__", None))
    }
    digest = hashlib.sha256()
    for path in sorted(files):
        if any(path.is_relative_to(package) for package in packages):
            digest.update(f"{path.relative_to(root)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def check_categories(checkpoint: str | Path, state: dict[str, Any], dataset: Any) -> None:
    """A checkpoint trained on another class set than ``dataset`` (a CocoDetection) is refused
    with one line: its predictions would carry the wrong category ids. Names count too: VOC
    numbers its classes in `classes` order, so the same ids can mean other classes."""
    trained = list(zip(state["category_ids"], state["category_names"], strict=True))
    given = list(zip(dataset.category_ids, dataset.category_names, strict=True))
    if trained != given:
        raise UserError(f"{checkpoint}: trained on categories {dict(trained)}, but "
                        f"{dataset.annotation_file} has {dict(given)}")
