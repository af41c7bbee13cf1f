"""Relation plots (drkd/relations_plot.py) from toy detectors + a toy Distiller's modules, and
the report stage drawing them for three models."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from conftest import toy_model, toy_params
from drkd import cli
from drkd.checkpoint import load, model_checkpoint, save_atomic
from drkd.config import DistillConfig, InstanceRelationConfig, PixelRelationConfig
from drkd.data.coco import CocoDetection
from drkd.distiller import Distiller
from drkd.models import build_detector
from drkd.modules.glore import GloRe
from drkd.relations_plot import load_distiller, pixel_relation, plot_relations
from stages import report

SMALL = dict(pixel=PixelRelationConfig(nodes=(4,) * 5, states=(8,) * 5),
             instance=InstanceRelationConfig(embed_dim=32, filter_hidden=8))


def write_models(data: Path, out: Path, **distill: Any) -> dict[str, Path]:
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
                          DistillConfig(**SMALL, **distill))  # type: ignore[arg-type]
    paths["modules"] = out / "drkd_modules.pt"
    save_atomic(distiller.modules_checkpoint(), paths["modules"])
    return paths


@pytest.fixture(scope="module")
def models(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    return write_models(tiny_data, tmp_path_factory.mktemp("models"))


def check_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 200
    assert path.stat().st_size > 10_000


def test_relation_plots_written(models: dict[str, Path], tiny_data: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    written = plot_relations(models["teacher"], models["student_drkd"], models["modules"],
                             tiny_data / "val.json", 4, tmp_path)
    assert written == [tmp_path / n for n in ("pixel_relations.png", "glore_drift.json",
                                               "instance_relations.png")]
    for path in (written[0], written[2]):
        check_png(path)
    drift = json.loads(written[1].read_text())
    assert {len(v) for v in drift.values()} == {5} and set(drift) == {"teacher", "student"}
    assert "placeholder" not in capsys.readouterr().out  # the tiny val set has >= 2 instances


def test_modules_loaded_into_the_distiller(models: dict[str, Path], tiny_data: Path) -> None:
    distiller, names = load_distiller(models["teacher"], models["student_drkd"],
                                      models["modules"])
    saved = load(models["modules"])["modules"]
    state = distiller.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    assert not distiller.training
    assert names == CocoDetection(tiny_data / "val.json").category_names


def test_pixel_relation_is_normalised_and_peaks_where_projection_matches() -> None:
    glore = GloRe(8, 4, 6)
    feature = torch.randn(8, 5, 7)
    relation = pixel_relation(glore, feature, (2, 3))
    assert relation.shape == (5, 7)
    relation = relation.detach()
    assert float(relation.min()) == 0 and float(relation.max()) == pytest.approx(1)
    proj = glore.projections(feature[None])[1][0].T
    expected = proj[:, 2 * 7 + 3] @ proj
    assert int(relation.flatten().argmax()) == int(expected.argmax())


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_modules_not_matching_config_name_the_file(models: dict[str, Path], tmp_path: Path,
                                                   change: str) -> None:
    state = load(models["modules"])
    if change == "missing":
        key = next(k for k in state["modules"] if k.startswith("method.filters."))
        del state["modules"][key]
    else:
        state["modules"]["method.relation_s.9.theta.weight"] = torch.zeros(1)
    broken = tmp_path / "broken_modules.pt"
    save_atomic(state, broken)
    with pytest.raises(ValueError, match=f"{re.escape(str(broken))}: .*{change} [a-z]"):
        load_distiller(models["teacher"], models["student_drkd"], broken)


def test_not_a_modules_file_names_the_file(models: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match=f"{re.escape(str(models['teacher']))}: not a DRKD"):
        load_distiller(models["teacher"], models["student_drkd"], models["teacher"])


@pytest.mark.parametrize("off", ["w_pr", "w_ir"])
def test_switched_off_term_skips_its_plot(tiny_data: Path, tmp_path: Path, off: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    paths = write_models(tiny_data, tmp_path, **{off: 0.0})
    written = plot_relations(paths["teacher"], paths["student_drkd"], paths["modules"],
                             tiny_data / "val.json", 2, tmp_path / "plots")
    skipped = "pixel_relations.png" if off == "w_pr" else "instance_relations.png"
    pixel = ("pixel_relations.png", "glore_drift.json")
    expected = ["instance_relations.png"] if off == "w_pr" else list(pixel)
    assert [p.name for p in written] == expected
    assert not (tmp_path / "plots" / skipped).exists()
    assert f"{skipped} skipped" in capsys.readouterr().out


def fake_metrics(ap: float) -> dict[str, Any]:
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
    return {**{k: ap for k in keys}, "APl": -1.0, "per_class_AP": {"circle": ap},
            "parameters": 1000, "inference_ms_per_image": 1.0}


def test_report_stage_with_relation_plots(models: dict[str, Path], tiny_data: Path,
                                          tmp_path: Path) -> None:
    for name, ap in (("teacher", 0.4), ("student", 0.2), ("student_drkd", 0.3)):
        (tmp_path / "eval" / name).mkdir(parents=True)
        (tmp_path / "eval" / name / "metrics.json").write_text(json.dumps(fake_metrics(ap)))
        (tmp_path / "eval" / name / "detections.json").write_text("[]")
    params = tmp_path / "params.yaml"
    toy_params(params, evaluate={"num_vis_images": 3})
    argv = ["--models", "teacher", "student", "student_drkd",
            "--eval-dir", str(tmp_path / "eval"),
            "--data", str(tiny_data), "--summary", str(tmp_path / "summary.json"),
            "--table", str(tmp_path / "summary.md"), "--plots-dir", str(tmp_path / "plots"),
            "--params", str(params), "--teacher", str(models["teacher"]),
            "--distilled", str(models["student_drkd"]), "--modules", str(models["modules"])]
    assert report.main(argv) == 0
    for name in ("pixel_relations.png", "instance_relations.png"):
        check_png(tmp_path / "plots" / name)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["student_drkd"]["gap_closed"] == pytest.approx(0.5)
    assert "| student_drkd | +10.0 |" in (tmp_path / "summary.md").read_text()


def test_report_relation_args_go_together(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--models", "teacher", "--summary", "s.json", "--table", "s.md",
            "--plots-dir", str(tmp_path), "--teacher", "models/teacher.pt"]
    assert cli.run(report.main, argv) == 2
    assert "--teacher, --distilled and --modules go together" in capsys.readouterr().err
