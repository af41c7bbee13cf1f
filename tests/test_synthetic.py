"""The embedded synthetic dataset: determinism and the properties the pipeline relies on."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_DATA
from drkd.config import DataConfig, SyntheticConfig, load_params
from drkd.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
Moderate = tuple[SyntheticConfig, dict[str, Any], Path]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_config_and_seed_give_identical_files(tmp_path: Path) -> None:
    cfg = DataConfig(source="synthetic", synthetic=TINY_DATA)
    prepare(cfg, seed=3, out_dir=tmp_path / "a")
    prepare(cfg, seed=3, out_dir=tmp_path / "b")
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert sum(name.endswith(".png") for name in a) == TINY_DATA.num_train + TINY_DATA.num_val
    assert {"train.json", "val.json", "stats.json"} <= set(a)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name


def test_different_seed_gives_different_data(tmp_path: Path) -> None:
    cfg = DataConfig(source="synthetic", synthetic=TINY_DATA)
    prepare(cfg, seed=0, out_dir=tmp_path / "a")
    prepare(cfg, seed=1, out_dir=tmp_path / "b")
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a.keys() == b.keys()
    assert a["train.json"] != b["train.json"] and a["val.json"] != b["val.json"]
    pngs = [name for name in a if name.endswith(".png")]
    assert all(a[name] != b[name] for name in pngs)
    # train and val come from different streams too
    assert a["images/train/000000.png"] != a["images/val/000000.png"]


def _default_size() -> SyntheticConfig:
    return SyntheticConfig(num_train=60, num_val=2)


def _params_yaml() -> SyntheticConfig:
    return dataclasses.replace(load_params(ROOT / "params.yaml").data.synthetic, num_train=60,
                               num_val=2)


@pytest.fixture(scope="module", params=[_default_size, _params_yaml],
                ids=["defaults", "params.yaml"])
def moderate(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Moderate:
    """60 train images at the configured size (128 px): (config, train COCO dict, folder)."""
    cfg: SyntheticConfig = request.param()
    out = tmp_path_factory.mktemp("moderate")
    prepare(DataConfig(source="synthetic", synthetic=cfg), seed=0, out_dir=out)
    return cfg, json.loads((out / "train.json").read_text()), out


def test_moderate_config_is_the_real_image_size(moderate: Moderate) -> None:
    cfg, coco, out = moderate
    assert cfg.image_size == 128
    assert len(coco["images"]) == 60
    for im in coco["images"][:5]:
        with Image.open(out / im["file_name"]) as image:
            assert image.size == (im["width"], im["height"]) == (128, 128)
            assert image.mode == "RGB"


def test_every_category_is_present(moderate: Moderate) -> None:
    _, coco, _ = moderate
    ids = {c["id"] for c in coco["categories"]}
    assert len(ids) >= 8
    assert {a["category_id"] for a in coco["annotations"]} == ids


def test_several_instances_per_image_with_repeated_classes(moderate: Moderate) -> None:
    _, coco, _ = moderate
    assert len(coco["annotations"]) / len(coco["images"]) >= 3
    per_image_class = Counter((a["image_id"], a["category_id"]) for a in coco["annotations"])
    assert max(per_image_class.values()) >= 2


def test_all_coco_size_buckets_are_present(moderate: Moderate) -> None:
    _, coco, _ = moderate
    areas = [a["bbox"][2] * a["bbox"][3] for a in coco["annotations"]]
    assert any(area < 32**2 for area in areas)
    assert any(32**2 <= area <= 96**2 for area in areas)
    assert any(area > 96**2 for area in areas)
    assert all(math.isclose(a["area"], a["bbox"][2] * a["bbox"][3], abs_tol=0.05)
               for a in coco["annotations"])


def test_boxes_lie_inside_the_image(moderate: Moderate) -> None:
    _, coco, _ = moderate
    size = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        width, height = size[a["image_id"]]
        assert w >= 1 and h >= 1, a
        assert x >= 0 and y >= 0 and x + w <= width and y + h <= height, a


def test_foreground_is_a_minority_of_pixels(moderate: Moderate) -> None:
    _, coco, _ = moderate
    masks = {im["id"]: np.zeros((im["height"], im["width"]), dtype=bool) for im in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        masks[a["image_id"]][int(y):math.ceil(y + h), int(x):math.ceil(x + w)] = True
    coverage = float(np.mean([mask.mean() for mask in masks.values()]))
    assert coverage < 0.4, f"boxes cover {coverage:.0%} of the pixels on average"


def test_no_object_is_drawn_below_min_object_size() -> None:
    """min_object_size above the small bucket's 32 px: the small objects are drawn at the
    minimum, not at 32 px (a star's or hexagon's tight box is at most 13% shorter)."""
    from drkd.data.synthetic import make_image

    cfg = SyntheticConfig(min_object_size=40, max_object_size=60)
    rng = np.random.default_rng(0)
    sides = [math.sqrt(w * h) for _ in range(30) for _, (_, _, w, h) in make_image(rng, cfg)[1]]
    assert len(sides) > 50 and min(sides) >= 36, min(sides)
