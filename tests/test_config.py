"""The strict params loader: frozen dataclasses, one-line errors naming the key path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from drkd import cli
from drkd.config import (
    ConfigError,
    DetectorConfig,
    ModelConfig,
    Params,
    TrainConfig,
    from_dict,
    load_params,
    parse_params,
    to_dict,
)

GOOD = {
    "seed": 3,
    "data": {"source": "synthetic", "synthetic": {"num_train": 10, "num_val": 5,
                                                  "image_size": 64, "max_object_size": 40}},
    "teacher": {
        "model": {"arch": "faster_rcnn", "backbone": "resnet50", "fpn_channels": 32,
                  "min_size": 64, "max_size": 96, "norm": "frozen"},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "optimizer": "sgd",
                  "schedule": "step", "milestones": [1, 2], "hflip": 0.0},
    },
    "student": {"model": {"arch": "fcos", "backbone": "mobilenet_v3_large"},
                "train": {"lr": 1}},
    "tracking": {"enabled": False, "experiment": "x"},
}


def write(tmp_path: Path, data: object, name: str = "params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def with_key(path: str, value: object) -> dict[str, object]:
    """GOOD with one dotted key set (creating mappings on the way)."""
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    node = data
    *parents, last = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


def error_of(tmp_path: Path, data: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_params(write(tmp_path, data))
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_loads_into_frozen_dataclasses(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, GOOD))
    assert isinstance(params, Params)
    assert params.seed == 3
    assert params.data.synthetic.num_train == 10
    assert params.data.synthetic.num_val == 5
    assert params.teacher.model == dataclasses.replace(
        ModelConfig(), arch="faster_rcnn", backbone="resnet50", fpn_channels=32, min_size=64,
        max_size=96, norm="frozen")
    assert params.teacher.train.milestones == (1, 2)  # list -> tuple: hashable and frozen
    assert params.teacher.train.optimizer == "sgd"
    assert params.teacher.train.hflip == 0.0
    # An int where a float is expected becomes a float.
    assert params.student.train.lr == 1.0 and isinstance(params.student.train.lr, float)
    # Unset keys keep their defaults.
    assert params.student.train.epochs == TrainConfig().epochs
    assert params.evaluate == Params().evaluate
    assert params.tracking.enabled is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.teacher.train.lr = 0.5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 1  # type: ignore[misc]


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_params(write(tmp_path, "")) == Params()


def test_round_trip_through_to_dict() -> None:
    params = parse_params(GOOD)
    assert parse_params(to_dict(params)) == params
    assert from_dict(DetectorConfig, to_dict(params.teacher)) == params.teacher


def test_unknown_key_names_full_path(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_key("teacher.train.lrr", 0.1))
    assert message.startswith("params.yaml: teacher.train.lrr: unknown key"), message


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_key("teachr", {}))
    assert message.startswith("params.yaml: teachr: unknown key"), message


def test_wrong_type_message_exact(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_key("teacher.train.lr", "fast"))
    assert message == "params.yaml: teacher.train.lr: expected a positive float, got 'fast'"


@pytest.mark.parametrize(
    ("key", "value", "expect"),
    [
        ("teacher.train.lr", -0.1, "expected a positive float, got -0.1"),
        ("teacher.train.lr", 0, "expected a positive float, got 0"),
        ("student.train.hflip", 1.5, "expected a float in [0, 1], got 1.5"),
        ("student.train.batch_size", 0, "expected a positive int, got 0"),
        ("student.train.batch_size", 2.5, "expected a positive int, got 2.5"),
        ("student.train.warmup_steps", -1, "expected a non-negative int, got -1"),
        ("teacher.model.arch", "yolo", "expected one of 'retinanet', 'faster_rcnn', 'fcos', "
                                       "got 'yolo'"),
        ("teacher.model.norm", "layer", "expected one of 'batch', 'group', 'frozen', got 'layer'"),
        ("data.source", "pascal", "expected one of 'synthetic', 'coco', 'voc', got 'pascal'"),
        ("teacher.train.milestones", 3, "expected a list of floats, got 3"),
        ("teacher.train", [1], "expected a mapping, got [1]"),
        ("tracking.enabled", "yes", "expected a boolean, got 'yes'"),
        ("seed", -1, "expected a non-negative int, got -1"),
        ("launcher", " ", "expected a command such as python or torchrun ..., got ' '"),
        ("tracking.experiment", "", "expected a non-empty name without surrounding spaces, got ''"),
        ("tune.study_name", " x", "expected a non-empty name without surrounding spaces, got ' x'"),
    ],
)
def test_bad_values(tmp_path: Path, key: str, value: object, expect: str) -> None:
    message = error_of(tmp_path, with_key(key, value))
    assert message == f"params.yaml: {key}: {expect}"


def test_bad_list_item_names_index(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_key("teacher.train.milestones", [1, "two"]))
    assert message.startswith("params.yaml: teacher.train.milestones[1]: expected"), message
    assert "'two'" in message
    message = error_of(tmp_path, with_key("distill.pixel.nodes", [4, 0, 4, 4, 4]))
    assert message == "params.yaml: distill.pixel.nodes[1]: expected a positive int, got 0"


@pytest.mark.parametrize("key", ["student.train.epochs", "seed", "data.synthetic.num_train"])
def test_bool_is_not_an_int(tmp_path: Path, key: str) -> None:
    message = error_of(tmp_path, with_key(key, True))
    assert message.startswith(f"params.yaml: {key}: expected"), message
    assert message.endswith("got True"), message


def test_bool_is_not_a_float(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_key("teacher.train.lr", True))
    assert message == "params.yaml: teacher.train.lr: expected a positive float, got True"


def test_invalid_yaml_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "teacher: {train: [1, 2\nseed: 0\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: not valid YAML"), message


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    message = error_of(tmp_path, "- 1\n- 2\n")
    assert message == "params.yaml: expected a mapping at the top level, got list"


def test_missing_file_names_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: cannot read"), message


def test_min_size_above_max_size(tmp_path: Path) -> None:
    data = with_key("student.model.min_size", 200)
    message = error_of(tmp_path, data)
    assert message == "params.yaml: student.model.min_size: must not exceed max_size"


def test_synthetic_cross_checks(tmp_path: Path) -> None:
    message = error_of(tmp_path, with_key("data.synthetic.min_objects", 9))
    assert message == "params.yaml: data.synthetic.min_objects: must not exceed max_objects"
    message = error_of(tmp_path, with_key("data.synthetic.max_object_size", 65))
    assert message == "params.yaml: data.synthetic.max_object_size: must not exceed image_size"


def test_topk_1_is_refused(tmp_path: Path) -> None:
    """One partner a row makes both relation matrices the same one-hot rows: L_IR is 0 whatever
    the student's features. Refused in `distill` and in a compare row; 0 and 2 load."""
    message = error_of(tmp_path, with_key("distill.instance.topk", 1))
    assert message.startswith("params.yaml: distill.instance.topk: 1 makes every relation row "
                              "one-hot"), message
    row = with_key("compare.methods", {"k1": {"method": "drkd", "instance": {"topk": 1}}})
    message = error_of(tmp_path, row)
    assert message.startswith("params.yaml: compare.methods.k1.instance.topk: 1"), message
    for topk in (0, 2):
        assert load_params(write(tmp_path, with_key("distill.instance.topk", topk)))


def test_coco_source_needs_paths(tmp_path: Path) -> None:
    data = with_key("data.source", "coco")
    message = error_of(tmp_path, data)
    assert message == ("params.yaml: data.coco.train_annotations: required when data.source "
                       "is 'coco'")
    data["data"]["coco"] = {"train_annotations": "a.json", "train_images": "img",  # type: ignore[index]
                            "val_annotations": "b.json", "val_images": "img"}
    assert load_params(write(tmp_path, data)).data.coco.val_annotations == "b.json"


def test_parse_params_has_no_file_name() -> None:
    with pytest.raises(ConfigError) as info:
        parse_params(with_key("teacher.train.lr", "fast"))
    assert str(info.value) == "teacher.train.lr: expected a positive float, got 'fast'"


def test_train_stage_bad_params_exits_2_with_one_line(
        tmp_path: Path, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import stages.train

    params = write(tmp_path, with_key("student.train.lr", "fast"))
    out = tmp_path / "student.pt"
    history = tmp_path / "history.csv"
    code = cli.run(stages.train.main, [
        "student", "--params", str(params), "--data", str(tiny_data), "--out", str(out),
        "--history", str(history), "--work-dir", str(tmp_path / "work")])
    assert code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines == ["error: params.yaml: student.train.lr: expected a positive float, got 'fast'"]
    assert not out.exists() and not history.exists() and not (tmp_path / "work").exists()


def test_code_defaults_are_params_yaml() -> None:
    """One set of defaults, the one a user gets: a key left out of a params file means the
    value params.yaml ships with."""
    from drkd.config import Params, flatten, load_params, to_dict

    shipped = flatten(to_dict(load_params(Path(__file__).resolve().parents[1] / "params.yaml")))
    defaults = flatten(to_dict(Params()))
    assert {k: v for k, v in defaults.items() if shipped.get(k) != v} == {}
