"""Pascal VOC input (drkd/data/voc.py): each VOC quirk on a tiny tree written here, the
strict params, the prepare stage, and evaluation in the dataset's own ids and names."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from drkd import cli
from drkd.config import ConfigError, UserError, VocConfig, parse_params
from drkd.data.coco import CocoDetection
from drkd.data.transforms import eval_transforms
from drkd.data.voc import voc_to_coco
from drkd.evaluation import coco_metrics, predict
from drkd.files import write_json
from stages import prepare as prepare_stage

# (name, (xmin, ymin, xmax, ymax), difficult) as a VOC XML writes them (1-based, inclusive).
Obj = tuple[str, tuple[float, float, float, float], int]


def xml_text(image_id: str, size: tuple[int, int] | None, objects: list[Obj]) -> str:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    if size is not None:
        node = ET.SubElement(root, "size")
        ET.SubElement(node, "width").text = str(size[0])
        ET.SubElement(node, "height").text = str(size[1])
        ET.SubElement(node, "depth").text = "3"
    for name, box, difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = str(difficult)
        bndbox = ET.SubElement(obj, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
            ET.SubElement(bndbox, key).text = str(value)
    return ET.tostring(root, encoding="unicode")


def make_voc(
    root: Path,
    train: dict[str, list[Obj]],
    val: dict[str, list[Obj]] | None = None,
    *,
    image_size: tuple[int, int] = (32, 24),
    xml_size: dict[str, tuple[int, int] | None] | None = None,
    skip_xml: tuple[str, ...] = (),
    skip_image: tuple[str, ...] = (),
) -> Path:
    """A VOC tree: one grey JPEG of ``image_size`` and one XML per id; train.txt / val.txt
    list the ids of ``train`` / ``val`` (val defaults to train's first id)."""
    val = val if val is not None else dict(list(train.items())[:1])
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    sizes = xml_size or {}
    for image_id, objects in {**train, **val}.items():
        if image_id not in skip_image:
            Image.new("RGB", image_size, (90, 90, 90)).save(root / "JPEGImages" / f"{image_id}.jpg")
        if image_id not in skip_xml:
            size = sizes.get(image_id, image_size)
            (root / "Annotations" / f"{image_id}.xml").write_text(xml_text(image_id, size, objects))
    for split, ids in (("train", train), ("val", val)):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def convert(root: Path, **cfg: Any) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    return voc_to_coco(VocConfig(root=str(root), **cfg))


def boxes_of(coco: dict[str, Any]) -> list[list[float]]:
    return [a["bbox"] for a in coco["annotations"]]


def as_dataset(coco: dict[str, Any], folder: Path, name: str = "train") -> CocoDetection:
    """The training reader on a converted split, written where prepare would."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json(coco, folder / f"{name}.json")
    return CocoDetection(folder / f"{name}.json")


def test_one_based_inclusive_coordinates_become_coco_boxes(tmp_path: Path) -> None:
    # 32x24 image. (1, 1, 10, 5) covers pixels 1..10 x 1..5: 10 x 5 pixels from the corner.
    # (23, 20, 32, 24) ends on the last pixel: exactly on the image's edge, not clipped.
    root = make_voc(tmp_path / "voc", {"a": [("cell", (1, 1, 10, 5), 0),
                                             ("cell", (23, 20, 32, 24), 0),
                                             ("cell", (5.5, 2, 9.5, 8), 0)]})
    coco, counts = convert(root)["train"]
    assert boxes_of(coco) == [[0, 0, 10, 5], [22, 19, 10, 5], [4.5, 1, 5, 7]]
    assert [a["area"] for a in coco["annotations"]] == [50, 50, 35]
    assert counts["dropped_boxes"] == {"clipped": 0, "degenerate": 0, "outside": 0,
                                       "unknown_class": 0}
    _, target = as_dataset(coco, tmp_path / "prepared")[0]
    assert target["boxes"].tolist() == [[0, 0, 10, 5], [22, 19, 32, 24], [4.5, 1, 9.5, 8]]


def test_difficult_objects_are_ignored_regions_never_targets(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": [("cell", (3, 3, 12, 12), 0),
                                             ("cell", (17, 5, 30, 20), 1)]})
    coco, counts = convert(root)["train"]
    assert [a["iscrowd"] for a in coco["annotations"]] == [0, 1]
    assert counts["difficult"] == 1
    # Training: the difficult box is no target.
    _, target = as_dataset(coco, tmp_path / "prepared")[0]
    assert target["boxes"].tolist() == [[2, 2, 12, 12]]
    # Evaluation: a detection on it is neither a hit nor a false positive, and missing it
    # costs no recall, whatever its score.
    gt = tmp_path / "prepared" / "train.json"
    normal = {"image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "score": 0.5}
    on_difficult = {"image_id": 1, "category_id": 1, "bbox": [16, 4, 14, 16], "score": 0.9}
    assert coco_metrics(gt, [normal])["AP"] == pytest.approx(1.0)
    assert coco_metrics(gt, [normal, on_difficult])["AP"] == pytest.approx(1.0)
    # The same box as a plain object: now it is a miss (recall 1/2) or a hit.
    plain = json.loads(gt.read_text())
    plain["annotations"][1]["iscrowd"] = 0
    write_json(plain, gt)
    assert coco_metrics(gt, [normal])["AP"] < 0.6
    assert coco_metrics(gt, [normal, on_difficult])["AP"] == pytest.approx(1.0)


def test_boxes_with_max_not_above_min_are_dropped(tmp_path: Path) -> None:
    # BCCD has two of these (a click in the labelling tool): xmin == xmax and ymin == ymax.
    root = make_voc(tmp_path / "voc", {"a": [("cell", (5, 5, 5, 5), 0),
                                             ("cell", (8, 9, 20, 4), 0),
                                             ("cell", (3, 3, 6, 6), 0)]})
    coco, counts = convert(root)["train"]
    assert boxes_of(coco) == [[2, 2, 4, 4]]
    assert counts["dropped_boxes"]["degenerate"] == 2


def test_boxes_outside_the_image_are_clipped_or_dropped_and_counted(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": [
        ("cell", (20, 10, 40, 30), 0),   # past the right and bottom -> [19, 9, 13, 15]
        ("cell", (0, -4, 5, 5), 0),      # 0-based writer / negative -> [0, 0, 5, 5]
        ("cell", (32, 1, 33, 5), 0),     # 1 px left inside -> [31, 0, 1, 5]
        ("cell", (33, 1, 40, 5), 0),     # starts past the last pixel: outside
        ("cell", (5, 30, 9, 40), 0),     # below the image: outside
        ("cell", (4, 24.5, 9, 40), 0),   # half a pixel left inside: degenerate once clipped
    ]})
    coco, counts = convert(root)["train"]
    assert boxes_of(coco) == [[19, 9, 13, 15], [0, 0, 5, 5], [31, 0, 1, 5]]
    assert counts["dropped_boxes"] == {"clipped": 3, "degenerate": 1, "outside": 2,
                                       "unknown_class": 0}
    _, target = as_dataset(coco, tmp_path / "prepared")[0]
    assert bool((target["boxes"][:, 0::2] <= 32).all() and (target["boxes"][:, 1::2] <= 24).all())


def test_xml_without_objects_keeps_its_image(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": [("cell", (1, 1, 8, 8), 0)], "empty": []})
    coco, _ = convert(root)["train"]
    assert [Path(im["file_name"]).name for im in coco["images"]] == ["a.jpg", "empty.jpg"]
    assert {a["image_id"] for a in coco["annotations"]} == {1}
    tensor, target = as_dataset(coco, tmp_path / "prepared")[1]
    assert tuple(tensor.shape) == (3, 24, 32)
    assert tuple(target["boxes"].shape) == (0, 4)


def test_split_order_ids_absolute_paths_and_max_images(tmp_path: Path) -> None:
    train = {"c": [("cell", (1, 1, 4, 4), 0)], "a": [("cell", (2, 2, 5, 5), 0)],
             "b": [("blob", (3, 3, 6, 6), 0)]}
    root = make_voc(tmp_path / "voc", train, {"v": [("cell", (1, 1, 9, 9), 0)]})
    coco, _ = convert(root)["train"]
    assert [(im["id"], Path(im["file_name"]).name) for im in coco["images"]] == [
        (1, "c.jpg"), (2, "a.jpg"), (3, "b.jpg")]
    assert coco["images"][0]["file_name"] == str((root / "JPEGImages" / "c.jpg").resolve())
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (32, 24)
    assert [a["id"] for a in coco["annotations"]] == [1, 2, 3]
    short, _ = convert(root, max_images=2)["train"]
    assert [im["id"] for im in short["images"]] == [1, 2]
    # blob only appears in image 3, left out: the class ids stay those of the whole splits.
    assert short["categories"] == coco["categories"] == [{"id": 1, "name": "blob"},
                                                         {"id": 2, "name": "cell"}]


def test_class_ids_from_the_xmls_or_from_the_configured_list(tmp_path: Path) -> None:
    # "zebra" only in val, "ant" only in train: both splits get the same, complete list.
    root = make_voc(tmp_path / "voc", {"a": [("cell", (1, 1, 4, 4), 0), ("ant", (5, 5, 9, 9), 0)]},
                    {"v": [("zebra", (1, 1, 9, 9), 0), ("cell", (2, 2, 6, 6), 0)]})
    out = convert(root)
    expected = [{"id": 1, "name": "ant"}, {"id": 2, "name": "cell"}, {"id": 3, "name": "zebra"}]
    assert out["train"][0]["categories"] == out["val"][0]["categories"] == expected
    assert [a["category_id"] for a in out["val"][0]["annotations"]] == [3, 2]
    listed = convert(root, classes=("zebra", "cell", "ant", "unused"))
    assert [(c["id"], c["name"]) for c in listed["val"][0]["categories"]] == [
        (1, "zebra"), (2, "cell"), (3, "ant"), (4, "unused")]
    assert [a["category_id"] for a in listed["val"][0]["annotations"]] == [1, 2]
    assert [a["category_id"] for a in listed["train"][0]["annotations"]] == [2, 3]


def test_unknown_class_is_an_error_or_skipped_and_counted(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": [("cell", (1, 1, 4, 4), 0), ("dog", (5, 5, 9, 9), 0),
                                             ("dog", (2, 2, 9, 9), 1)]})
    with pytest.raises(UserError) as info:
        convert(root, classes=("cell",))
    message = str(info.value)
    assert "\n" not in message
    assert str(root / "Annotations" / "a.xml") in message
    assert "object 2: class 'dog' is not in data.voc.classes (cell)" in message
    coco, counts = convert(root, classes=("cell",), ignore_unknown_classes=True)["train"]
    assert boxes_of(coco) == [[0, 0, 4, 4]]
    assert counts["dropped_boxes"]["unknown_class"] == 2
    assert counts["difficult"] == 0  # the skipped difficult dog is no ignored region


def _exif_turned(root: Path) -> None:
    """Stored 24x32 with EXIF orientation 6 (shown turned, 32x24), as a camera writes it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (24, 32), (90, 90, 90)).save(root / "JPEGImages" / "a.jpg", exif=exif)


def test_xml_size_missing_or_zero_is_read_from_the_image(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": [("cell", (1, 1, 4, 4), 0)], "b": [], "c": []},
                    xml_size={"a": None, "b": (0, 0)})
    coco, counts = convert(root)["train"]
    assert [(im["width"], im["height"]) for im in coco["images"]] == [(32, 24)] * 3
    assert counts["size_from_image"] == 2


def test_xml_size_matching_the_exif_turned_image_is_kept(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": [("cell", (1, 1, 30, 4), 0)]})
    _exif_turned(root)
    coco, counts = convert(root)["train"]
    assert (coco["images"][0]["width"], coco["images"][0]["height"]) == (32, 24)
    assert counts["size_from_image"] == 0
    tensor, target = as_dataset(coco, tmp_path / "prepared")[0]
    assert tuple(tensor.shape) == (3, 24, 32)  # turned by the reader, as the XML says
    assert target["boxes"].tolist() == [[0, 0, 30, 4]]


def test_xml_size_disagreeing_with_the_image_is_an_error(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", {"a": [("cell", (1, 1, 40, 30), 0)]},
                    xml_size={"a": (64, 48)})
    with pytest.raises(UserError) as info:
        convert(root)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(root / "Annotations" / "a.xml"))
    assert "<size> is 64x48" in message and "a.jpg is 32x24" in message


def _cli_error(params: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.run(prepare_stage.main, ["--params", str(params), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not (out / "train.json").exists() and not (out / "stats.json").exists()
    return err


def voc_params(tmp_path: Path, root: Path, **voc: Any) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "voc", "voc": {"root": str(root), **voc}},
                                      "tracking": {"enabled": False}}))
    return params


@pytest.mark.parametrize("missing", ["xml", "image"])
def test_listed_image_without_xml_or_file_is_one_line_error(
    tmp_path: Path, missing: str, capsys: pytest.CaptureFixture[str]
) -> None:
    train = {"a": [("cell", (1, 1, 4, 4), 0)], "gone": [("cell", (1, 1, 4, 4), 0)]}
    root = make_voc(tmp_path / "voc", train, {"a": []},
                    **({"skip_xml": ("gone",)} if missing == "xml" else {"skip_image": ("gone",)}))
    err = _cli_error(voc_params(tmp_path, root), tmp_path / "prepared", capsys)
    assert f"{root / 'ImageSets' / 'Main' / 'train.txt'}: image gone:" in err
    if missing == "xml":
        assert f"annotation file not found: {root / 'Annotations' / 'gone.xml'}" in err
    else:
        tried = "(tried gone.jpg, gone.jpeg, gone.png)"
        assert f"no image file in {root / 'JPEGImages'} {tried}" in err


BAD_XML = {
    "not XML": ("<annotation><object>", ["a.xml: not valid XML"]),
    "box field not a number": (
        xml_text("a", (32, 24), [("cell", (1, 1, 4, 4), 0)]).replace("<xmax>4", "<xmax>four"),
        ["a.xml: object 1 (cell): <bndbox>/<xmax> must be a number, got 'four'"]),
    "box field missing": (
        xml_text("a", (32, 24), [("cell", (1, 1, 4, 4), 0)]).replace("<ymin>1</ymin>", ""),
        ["a.xml: object 1 (cell): <bndbox>/<ymin> missing"]),
    "object without name": (
        xml_text("a", (32, 24), [("cell", (1, 1, 4, 4), 0)]).replace("<name>cell</name>", ""),
        ["a.xml: object 1: <name> missing"]),
    "difficult not 0/1": (
        xml_text("a", (32, 24), [("cell", (1, 1, 4, 4), 0)]).replace(
            "<difficult>0", "<difficult>maybe"),
        ["a.xml: object 1 (cell): <difficult> must be 0 or 1, got 'maybe'"]),
    "another tool's XML": ("<annotations><image name='a.jpg'/></annotations>",
                           ["a.xml: not a Pascal VOC annotation (its root element is "
                            "<annotations>, not <annotation>)"]),
}


@pytest.mark.parametrize("case", list(BAD_XML))
def test_bad_xml_is_one_line_error_naming_file_and_field(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_voc(tmp_path / "voc", {"a": []}, {"b": []})
    text, expected = BAD_XML[case]
    (root / "Annotations" / "a.xml").write_text(text)
    err = _cli_error(voc_params(tmp_path, root), tmp_path / "prepared", capsys)
    for part in expected:
        assert part in err


def test_bad_split_files_are_one_line_errors(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = make_voc(tmp_path / "voc", {"a": [("cell", (1, 1, 4, 4), 0)]})
    out = tmp_path / "prepared"
    err = _cli_error(voc_params(tmp_path, root, val_split="test"), out, capsys)
    assert f"{root / 'ImageSets' / 'Main' / 'test.txt'}: cannot read split file" in err
    (root / "ImageSets" / "Main" / "val.txt").write_text("a\n\na\n")
    err = _cli_error(voc_params(tmp_path, root), out, capsys)
    assert "val.txt: image a is listed twice" in err
    err = _cli_error(voc_params(tmp_path, tmp_path), out, capsys)
    assert f"data.voc.root: {tmp_path} has no Annotations folder" in err


def test_split_files_in_utf8_with_a_byte_order_mark_or_not_utf8(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A BOM (Windows editors) is not part of the first id; Latin-1 is one line."""
    root = make_voc(tmp_path / "voc", {"a": [("cell", (1, 1, 4, 4), 0)]}, {"b": []})
    (root / "ImageSets" / "Main" / "train.txt").write_bytes(b"\xef\xbb\xbfa\r\n")
    coco, _ = convert(root)["train"]
    assert [Path(im["file_name"]).name for im in coco["images"]] == ["a.jpg"]
    (root / "ImageSets" / "Main" / "train.txt").write_bytes(b"caf\xe9\n")
    err = _cli_error(voc_params(tmp_path, root), tmp_path / "prepared", capsys)
    assert "train.txt: not UTF-8 text (byte 3: invalid continuation byte)" in err


def test_a_file_read_twice_or_a_validation_image_in_training_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two XMLs of one split whose <filename> names one file, and a val split inside the
    train split (VOC's val is part of its trainval): one line each, nothing written."""
    root = make_voc(tmp_path / "voc", {"a": [("cell", (1, 1, 4, 4), 0)], "b": []}, {"v": []},
                    skip_image=("b",))
    xml = root / "Annotations" / "b.xml"
    xml.write_text(xml.read_text().replace("<filename>b.jpg</filename>",
                                           "<filename>a.jpg</filename>"))
    out = tmp_path / "prepared"
    err = _cli_error(voc_params(tmp_path, root), out, capsys)
    assert f"train.txt: images a and b: both read {root / 'JPEGImages' / 'a.jpg'}" in err
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nv\n")
    err = _cli_error(voc_params(tmp_path, root), out, capsys)
    shared = (root / "JPEGImages" / "v.jpg").resolve()
    assert err == ("error: data.voc: train_split and val_split: 1 of the 1 validation images "
                   f"are training images too (first: {shared})\n")


def test_voc_params_are_checked_by_the_strict_loader() -> None:
    good = parse_params({"data": {"source": "voc", "voc": {
        "root": "d", "train_split": "trainval", "val_split": "test", "classes": ["b", "a"],
        "ignore_unknown_classes": True, "max_images": 3}}})
    assert good.data.voc == VocConfig("d", "trainval", "test", ("b", "a"), True, 3)
    bad = {
        "data.voc.root: required when data.source is 'voc'": {"source": "voc"},
        "data.voc.roots: unknown key": {"voc": {"roots": "d"}},
        "data.voc.classes[1]: duplicate class 'a'": {"voc": {"classes": ["a", "a"]}},
        "data.voc.classes[0]: expected a non-empty name without surrounding spaces": {
            "voc": {"classes": [" a"]}},
        "data.voc.max_images: expected a non-negative int, got -1": {"voc": {"max_images": -1}},
        "data.voc.ignore_unknown_classes: expected a boolean": {
            "voc": {"ignore_unknown_classes": "yes"}},
        "data.source: expected one of 'synthetic', 'coco', 'voc'": {"source": "pascal"},
    }
    for expected, data in bad.items():
        with pytest.raises(ConfigError, match="^" + re.escape(expected)):
            parse_params({"data": data})


def test_prepare_stage_end_to_end_on_voc(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = make_voc(tmp_path / "voc", {
        "a": [("WBC", (1, 1, 10, 10), 0), ("RBC", (5, 5, 5, 5), 0), ("RBC", (20, 10, 40, 30), 0)],
        "b": [("RBC", (2, 2, 6, 6), 1), ("Platelets", (3, 3, 8, 8), 0)],
        "c": [("RBC", (1, 1, 4, 4), 0)],
    }, {"v": [("RBC", (1, 1, 8, 8), 0)], "w": []})
    out = tmp_path / "prepared"
    params = voc_params(tmp_path, root, max_images=2, classes=["RBC", "WBC", "Platelets"])
    assert prepare_stage.main(["--params", str(params), "--out", str(out)]) == 0
    assert "prepared 2 train / 2 val images (4 / 1 instances)" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert stats["source"] == "voc"
    assert stats["train"]["dropped_boxes"] == {"clipped": 1, "degenerate": 1, "outside": 0,
                                               "unknown_class": 0}
    assert stats["train"]["difficult"] == stats["train"]["crowd"] == 1
    assert stats["train"]["size_from_image"] == 0
    assert stats["train"]["instances_per_category"] == {"Platelets": 1, "RBC": 2, "WBC": 1}
    assert stats["val"]["images_without_annotations"] == 1
    train = CocoDetection(out / "train.json")
    assert train.category_ids == [1, 2, 3]
    assert train.category_names == ["RBC", "WBC", "Platelets"]
    _, target = train[0]
    assert target["labels"].tolist() == [2, 1]
    assert target["boxes"].tolist() == [[0, 0, 10, 10], [19, 9, 32, 24]]


class Replay(nn.Module):
    """A stand-in detector that returns prepared outputs, one per image, in order."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        taken, self.outputs = self.outputs[: len(images)], self.outputs[len(images):]
        return taken


def test_evaluation_uses_the_datasets_own_ids_and_class_names(tmp_path: Path) -> None:
    # Classes listed out of alphabetical order: zebra is id 1, ant id 2 (labels 1 and 2).
    root = make_voc(tmp_path / "voc", {"a": []}, {
        "v1": [("zebra", (1, 1, 10, 10), 0), ("ant", (15, 5, 30, 20), 0)],
        "v2": [("ant", (3, 3, 12, 12), 0)],
    })
    out = tmp_path / "prepared"
    params = voc_params(tmp_path, root, classes=["zebra", "ant"])
    assert prepare_stage.main(["--params", str(params), "--out", str(out)]) == 0
    val = CocoDetection(out / "val.json", eval_transforms())

    def output(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.ones(len(labels)), "labels": torch.tensor(labels)}

    # Every ground-truth box found with its training label; then the ants only.
    found = [output([[0, 0, 10, 10], [14, 4, 30, 20]], [1, 2]), output([[2, 2, 12, 12]], [2])]
    detections, _ = predict(Replay(found), val, 2, torch.device("cpu"), progress=False)
    assert [(d["image_id"], d["category_id"]) for d in detections] == [(1, 1), (1, 2), (2, 2)]
    metrics = coco_metrics(out / "val.json", detections)
    assert metrics["per_class_AP"] == {"zebra": pytest.approx(1.0), "ant": pytest.approx(1.0)}
    ants = [output([[14, 4, 30, 20]], [2]), output([[2, 2, 12, 12]], [2])]
    detections, _ = predict(Replay(ants), val, 2, torch.device("cpu"), progress=False)
    metrics = coco_metrics(out / "val.json", detections)
    assert metrics["per_class_AP"] == {"zebra": 0.0, "ant": pytest.approx(1.0)}
