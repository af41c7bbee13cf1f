"""Relation plots (drkd/relations_plot.py) from toy detectors + a toy Distiller's modules (the
report stage drawing them for three models is in test_evaluate_report.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from conftest import SMALL_DRKD, toy_model, write_relation_models
from drkd import cli
from drkd.checkpoint import load, model_checkpoint, save_atomic
from drkd.config import DistillConfig
from drkd.data.coco import CocoDetection
from drkd.distiller import Distiller
from drkd.models import build_detector
from drkd.modules.glore import GloRe
from drkd.relations_plot import load_distiller, pixel_relation, plot_relations
from stages import report


@pytest.fixture(scope="module")
def models(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    return write_relation_models(tiny_data, tmp_path_factory.mktemp("models"))


def test_relation_plots_written(models: dict[str, Path], tiny_data: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str],
                                saved_figures: dict[str, Any]) -> None:
    written = plot_relations(models["teacher"], models["student_drkd"], models["modules"],
                             tiny_data / "val.json", 4, tmp_path)
    assert written == [tmp_path / n for n in ("pixel_relations.png", "glore_drift.json",
                                               "instance_relations.png")]
    for path in (written[0], written[2]):
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200
    val = CocoDetection(tiny_data / "val.json")
    # Pixel relations: a row per image (the 4 asked for), the image with its query, then the
    # teacher's and the student's relation maps over it (0..1), and one colour bar.
    pixel = saved_figures["pixel_relations.png"]
    panels = [ax for ax in pixel.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 4 * 3 and len(pixel.axes) == 4 * 3 + 1
    for row, info in zip(range(0, 12, 3), val.images, strict=True):
        image, teacher, student = panels[row:row + 3]
        assert image.get_title().startswith(f"image {info['id']}\n")
        assert (teacher.get_title(), student.get_title()) == (
            "teacher: GloRe_t[0]", "student: GloRe_s[0]")
        for ax in (teacher, student):
            heat = ax.get_images()[1].get_array()
            assert heat.min() >= 0 and heat.max() <= 1 and heat.max() > heat.min()
    # Instance relations: a row per image with >= 2 instances, R_t and R_s n x n, rows sum
    # to 1.
    count = {info["id"]: len(val.targets[info["id"]][0]) for info in val.images[:4]}
    with_two = [info for info in val.images[:4] if count[info["id"]] >= 2]
    instance = saved_figures["instance_relations.png"]
    panels = [ax for ax in instance.axes if ax.get_label() != "<colorbar>"]
    assert len(panels) == 3 * len(with_two) > 0
    for row, info in zip(range(0, len(panels), 3), with_two, strict=True):
        boxes, teacher, student = panels[row:row + 3]
        n = count[info["id"]]
        assert boxes.get_title() == f"image {info['id']}: {n} instances"
        assert (teacher.get_title(), student.get_title()) == ("teacher R_t", "student R_s")
        for ax in (teacher, student):
            matrix = ax.get_images()[0].get_array()
            assert matrix.shape == (n, n)
            assert list(matrix.sum(1)) == pytest.approx([1.0] * n, abs=1e-5)
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


def test_a_student_started_from_the_teacher_is_loaded_as_distilled(
        tiny_data: Path, tmp_path: Path) -> None:
    """Modules trained with init_student (teacher and student of one FPN width): the plots read
    the distilled student, never a copy of the teacher's neck and head put over it."""
    dataset = CocoDetection(tiny_data / "train.json")
    paths, detectors = {}, {}
    for seed, name in enumerate(("teacher", "student")):
        torch.manual_seed(seed)
        detectors[name] = build_detector(toy_model(), dataset.num_classes)
        paths[name] = tmp_path / f"{name}.pt"
        save_atomic(model_checkpoint(detectors[name], toy_model(), dataset.category_ids,
                                     dataset.category_names), paths[name])
    trained = Distiller(detectors["student"], detectors["teacher"],
                        DistillConfig(**SMALL_DRKD, init_student=True))  # type: ignore[arg-type]
    save_atomic(trained.modules_checkpoint(), tmp_path / "modules.pt")
    saved = load(paths["student"])["model"]  # as distilled: its neck differs from the teacher's
    logits = "head.classification_head.cls_logits.weight"
    assert not torch.equal(saved[logits], detectors["teacher"].state_dict()[logits])
    distiller, _ = load_distiller(paths["teacher"], paths["student"], tmp_path / "modules.pt")
    assert all(torch.equal(distiller.student.state_dict()[k], v) for k, v in saved.items())


def test_pixel_relation_is_normalised_and_peaks_where_projection_matches() -> None:
    glore = GloRe(8, 4, 6)
    feature = torch.randn(8, 5, 7)
    relation = pixel_relation(glore, feature, (2, 3))
    assert relation.shape == (5, 7)
    relation = relation.detach()
    assert float(relation.min()) == 0 and float(relation.max()) == pytest.approx(1)
    # B = W_B x + b_B: the node rows of the unit's projection, after its 6 state rows
    proj = glore.project.weight[6:] @ feature.flatten(1) + glore.project.bias[6:, None]  # (N, HW)
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
def test_switched_off_term_gets_a_placeholder(tiny_data: Path, tmp_path: Path, off: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A term switched off leaves a placeholder saying why, not nothing: DVC declares both
    pictures, and an earlier run's picture must not pass for this run's."""
    paths = write_relation_models(tiny_data, tmp_path, **{off: 0.0})
    plots = tmp_path / "plots"
    plots.mkdir()
    skipped = "pixel_relations.png" if off == "w_pr" else "instance_relations.png"
    Image.new("RGB", (8, 8)).save(plots / skipped)  # an earlier run's
    written = plot_relations(paths["teacher"], paths["student_drkd"], paths["modules"],
                             tiny_data / "val.json", 2, plots)
    expected = (["pixel_relations.png", "instance_relations.png"] if off == "w_pr" else
                ["pixel_relations.png", "glore_drift.json", "instance_relations.png"])
    assert [p.name for p in written] == expected
    with Image.open(plots / skipped) as image:
        assert min(image.size) > 8  # replaced
    assert f"{skipped}: {paths['modules']} has no " in capsys.readouterr().out


def test_drkd_beside_another_method_is_plotted(tiny_data: Path, tmp_path: Path) -> None:
    """MGD with `plus: [drkd]` (a combination row): DRKD's modules are found in it."""
    paths = write_relation_models(tiny_data, tmp_path, method="mgd", plus=("drkd",))
    written = plot_relations(paths["teacher"], paths["student_drkd"], paths["modules"],
                             tiny_data / "val.json", 2, tmp_path / "plots")
    assert [p.name for p in written] == ["pixel_relations.png", "glore_drift.json",
                                         "instance_relations.png"]
    drift = json.loads((tmp_path / "plots" / "glore_drift.json").read_text())
    assert set(drift) == {"teacher", "student"}


def test_report_relation_args_go_together(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--models", "teacher", "--summary", "s.json", "--table", "s.md",
            "--plots-dir", str(tmp_path), "--teacher", "models/teacher.pt"]
    assert cli.run(report.main, argv) == 2
    assert "--teacher, --distilled and --modules go together" in capsys.readouterr().err
