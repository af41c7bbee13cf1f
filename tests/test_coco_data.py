"""COCO-format datasets on disk: clean_coco, CocoDetection loading, the prepare stage."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from drkd import cli
from drkd.data.coco import CocoDetection
from drkd.data.prepare import write_json
from drkd.data.validate import clean_coco

RED = (230, 20, 20)
GREY = (90, 90, 90)


def ann(id: int, image_id: int, bbox: Any, category_id: int = 1, **extra: Any) -> dict[str, Any]:
    return {"id": id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def make_dataset(root: Path, annotations: list[dict[str, Any]], *,
                 images: list[dict[str, Any]] | None = None,
                 categories: list[dict[str, Any]] | None = None, name: str = "instances.json",
                 skip_files: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Write ``root/<name>`` and an RGB file for every image entry; return (json, image dir)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    if images is None:
        images = [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}]
    for im in images:
        if im["file_name"] not in skip_files:
            Image.new("RGB", (im["width"], im["height"]), GREY).save(image_dir / im["file_name"])
    if categories is None:
        categories = [{"id": 1, "name": "thing"}]
    path = root / name
    coco = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(coco))
    return path, image_dir


def cleaned_dataset(tmp_path: Path, coco: dict[str, Any]) -> CocoDetection:
    """Write a cleaned dict where prepare would (a different folder than the images)."""
    out = tmp_path / "prepared"
    out.mkdir()
    write_json(coco, out / "train.json")
    return CocoDetection(out / "train.json")


def test_non_contiguous_category_ids_map_to_contiguous_labels(tmp_path: Path) -> None:
    categories = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"},
                  {"id": 7, "name": "train"}]
    anns = [ann(1, 1, [1, 1, 5, 5], 90), ann(2, 1, [10, 2, 5, 5], 1), ann(3, 1, [20, 3, 5, 5], 7)]
    path, image_dir = make_dataset(tmp_path, anns, categories=categories)
    coco, _ = clean_coco(path, image_dir, 0)
    assert sorted(c["id"] for c in coco["categories"]) == [1, 7, 90]
    ds = cleaned_dataset(tmp_path, coco)
    assert ds.num_classes == 4
    assert ds.category_ids == [1, 7, 90]
    assert ds.category_names == ["person", "train", "toothbrush"]
    _, target = ds[0]
    assert target["labels"].tolist() == [3, 1, 2]
    assert [ds.category_ids[label - 1] for label in target["labels"].tolist()] == [90, 1, 7]
    assert target["boxes"].tolist() == [[1, 1, 6, 6], [10, 2, 15, 7], [20, 3, 25, 8]]


def test_crowd_box_clipped_kept_in_json_but_not_a_target(tmp_path: Path) -> None:
    """A crowd box is an ignore region for COCOeval: clipped to the 32x24 image like any box
    (one of negative width is dropped), kept in the json, never a training target."""
    anns = [ann(1, 1, [2, 2, 8, 8]), ann(2, 1, [-5, 10, 50, 40], iscrowd=1, area=321.5),
            ann(3, 1, [20, 5, -10, 5], iscrowd=1)]
    path, image_dir = make_dataset(tmp_path, anns)
    coco, dropped = clean_coco(path, image_dir, 0)
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    assert crowd == [{"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 10, 32, 14],
                      "area": 321.5, "iscrowd": 1}]
    assert dropped == {"clipped": 1, "degenerate": 1, "outside": 0}
    _, target = cleaned_dataset(tmp_path, coco)[0]
    assert target["boxes"].tolist() == [[2, 2, 10, 10]]
    assert target["labels"].tolist() == [1]


def test_annotation_id_beyond_32_bit_survives(tmp_path: Path) -> None:
    big = 2**40 + 5
    path, image_dir = make_dataset(tmp_path, [ann(big, 1, [3, 4, 10, 6])])
    coco, _ = clean_coco(path, image_dir, 0)
    assert coco["annotations"][0]["id"] == big
    out = tmp_path / "train.json"
    write_json(coco, out)
    api = COCO(str(out))
    assert api.getAnnIds(imgIds=[1]) == [big]
    assert api.anns[big]["bbox"] == [3, 4, 10, 6]


@pytest.mark.parametrize(("mode", "colour", "rgb"), [
    ("L", 100, (100, 100, 100)),
    ("RGBA", (10, 20, 30, 128), (10, 20, 30)),
    ("P", 1, (40, 200, 60)),
    ("RGB", (1, 2, 3), (1, 2, 3)),
])
def test_image_modes_load_as_3_channel_uint8(tmp_path: Path, mode: str, colour: Any,
                                             rgb: tuple[int, int, int]) -> None:
    path, image_dir = make_dataset(tmp_path, [ann(1, 1, [1, 1, 4, 4])])
    image = Image.new(mode, (32, 24), colour)
    if mode == "P":
        image.putpalette([0, 0, 0, 40, 200, 60] + [0] * (256 * 3 - 6))
    image.save(image_dir / "a.png")
    with Image.open(image_dir / "a.png") as saved:
        assert saved.mode == mode
    coco, _ = clean_coco(path, image_dir, 0)
    tensor, _ = cleaned_dataset(tmp_path, coco)[0]
    assert tensor.dtype == torch.uint8
    assert tuple(tensor.shape) == (3, 24, 32)
    assert tensor[:, 5, 7].tolist() == list(rgb)
    assert bool((tensor == tensor[:, :1, :1]).all())


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_jpeg_uses_displayed_orientation(tmp_path: Path, orientation: int) -> None:
    # What a viewer shows (and the annotator labelled): 20 x 40, red block near the bottom left.
    displayed = Image.new("RGB", (20, 40), GREY)
    box = [2, 24, 12, 12]  # x, y, w, h
    displayed.paste(RED, (box[0], box[1], box[0] + box[2], box[1] + box[3]))
    # Stored sideways (40 x 20) with the EXIF tag that turns it back upright.
    undo = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]
    stored = displayed.transpose(undo)
    assert stored.size == (40, 20)
    images = [{"id": 1, "file_name": "photo.jpg", "width": 20, "height": 40}]
    path, image_dir = make_dataset(tmp_path, [ann(1, 1, box)], images=images,
                                   skip_files=("photo.jpg",))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(image_dir / "photo.jpg", exif=exif, quality=95)

    coco, dropped = clean_coco(path, image_dir, 0)
    assert dropped == {"clipped": 0, "degenerate": 0, "outside": 0}
    tensor, target = cleaned_dataset(tmp_path, coco)[0]
    assert tuple(tensor.shape) == (3, 40, 20)
    x0, y0, x1, y1 = (int(v) for v in target["boxes"][0].tolist())
    assert (x0, y0, x1, y1) == (2, 24, 14, 36)
    inside = tensor[:, y0 + 2:y1 - 2, x0 + 2:x1 - 2].reshape(3, -1).float().mean(1)
    assert inside[0] > 200 and inside[1] < 60 and inside[2] < 60
    outside = tensor[:, 2:18, 2:18].reshape(3, -1).float().mean(1)  # top half: background
    assert (outside - torch.tensor(GREY, dtype=torch.float32)).abs().max() < 15


def test_image_without_annotations_is_kept(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.png", "width": 32, "height": 24},
              {"id": 2, "file_name": "b.png", "width": 16, "height": 16}]
    path, image_dir = make_dataset(tmp_path, [ann(1, 1, [1, 1, 5, 5])], images=images)
    coco, _ = clean_coco(path, image_dir, 0)
    assert [im["id"] for im in coco["images"]] == [1, 2]
    ds = cleaned_dataset(tmp_path, coco)
    tensor, target = ds[1]
    assert target["image_id"] == 2
    assert tuple(tensor.shape) == (3, 16, 16)
    assert tuple(target["boxes"].shape) == (0, 4)
    assert tuple(target["labels"].shape) == (0,)


def test_bad_boxes_are_clipped_or_dropped_and_counted(tmp_path: Path) -> None:
    anns = [
        ann(1, 1, [2, 2, 10, 10]),                   # fine; area and iscrowd filled in
        ann(2, 1, [5, 5, 0.5, 10], area=5.0),        # degenerate: w < 1
        ann(3, 1, [40, 5, 5, 5]),                    # entirely right of the 32 px image
        ann(4, 1, [-10, -10, 5, 5]),                 # entirely above-left
        ann(5, 1, [28, 20, 10, 10], area=80.0),      # partly outside -> [28, 20, 4, 4]
        ann(6, 1, [31.5, 2, 5, 5]),                  # clipped to 0.5 px wide -> degenerate
        ann(7, 1, [-3, 0, 13, 24], iscrowd=0),       # clipped on the left -> [0, 0, 10, 24]
    ]
    path, image_dir = make_dataset(tmp_path, anns)
    coco, dropped = clean_coco(path, image_dir, 0)
    assert dropped == {"clipped": 2, "degenerate": 2, "outside": 2}
    kept = {a["id"]: a for a in coco["annotations"]}
    assert sorted(kept) == [1, 5, 7]
    assert kept[1]["bbox"] == [2, 2, 10, 10] and kept[1]["area"] == 100 and kept[1]["iscrowd"] == 0
    assert kept[5]["bbox"] == [28, 20, 4, 4] and kept[5]["area"] == 16
    assert kept[7]["bbox"] == [0, 0, 10, 24] and kept[7]["area"] == 240
    _, target = cleaned_dataset(tmp_path, coco)[0]
    boxes = target["boxes"]
    assert bool((boxes[:, 0::2] <= 32).all() and (boxes[:, 1::2] <= 24).all())
    assert bool((boxes >= 0).all())


def test_max_images_keeps_first_ids_and_only_checks_their_files(tmp_path: Path) -> None:
    images = [{"id": i, "file_name": f"{i}.png", "width": 16, "height": 16} for i in (9, 3, 5)]
    anns = [ann(1, 9, [1, 1, 4, 4]), ann(2, 3, [1, 1, 4, 4]), ann(3, 5, [2, 2, 4, 4])]
    path, image_dir = make_dataset(tmp_path, anns, images=images, skip_files=("9.png",))
    coco, _ = clean_coco(path, image_dir, 2)
    assert [im["id"] for im in coco["images"]] == [3, 5]
    assert sorted(a["id"] for a in coco["annotations"]) == [2, 3]
    assert coco["images"][0]["file_name"] == str((image_dir / "3.png").resolve())
    assert Path(coco["images"][0]["file_name"]).is_absolute()
    with pytest.raises(ValueError, match="image 9: file not found"):
        clean_coco(path, image_dir, 0)


def _missing_file(root: Path) -> tuple[Path, Path]:
    images = [{"id": 1, "file_name": "a.png", "width": 32, "height": 24},
              {"id": 7, "file_name": "gone.png", "width": 32, "height": 24}]
    return make_dataset(root, [], images=images, skip_files=("gone.png",))


def _invalid_json(root: Path) -> tuple[Path, Path]:
    path, image_dir = make_dataset(root, [])
    path.write_text('{\n  "images": [],\n  "annotations": [oops]\n}\n')
    return path, image_dir


def _zero_width(root: Path) -> tuple[Path, Path]:
    path, image_dir = make_dataset(root, [])
    coco = json.loads(path.read_text())
    coco["images"] = [{"id": 3, "file_name": "a.png", "width": 0, "height": 5}]
    path.write_text(json.dumps(coco))
    return path, image_dir


def _no_annotations(root: Path) -> tuple[Path, Path]:
    path, image_dir = make_dataset(root, [])
    path.write_text(json.dumps({"images": [], "categories": []}))
    return path, image_dir


def _one_file_twice(root: Path) -> tuple[Path, Path]:
    images = [{"id": 1, "file_name": "a.png", "width": 32, "height": 24},
              {"id": 2, "file_name": "./a.png", "width": 32, "height": 24}]
    return make_dataset(root, [], images=images)


def _size_not_the_files(root: Path) -> tuple[Path, Path]:
    path, image_dir = make_dataset(root, [])
    Image.new("RGB", (24, 20), GREY).save(image_dir / "a.png")  # the json says 32x24
    return path, image_dir


def _not_an_image(root: Path) -> tuple[Path, Path]:
    path, image_dir = make_dataset(root, [])
    (image_dir / "a.png").write_bytes(b"not a png")
    return path, image_dir


BAD_DATASETS: dict[str, tuple[Callable[[Path], tuple[Path, Path]], list[str]]] = {
    "two categories of one name": (
        lambda r: make_dataset(r, [], categories=[{"id": 1, "name": "cat"},
                                                  {"id": 4, "name": "cat"}]),
        ["categories 1 and 4: both are named 'cat'"]),
    "two images of one file": (_one_file_twice, ["images 1 and 2: both are", "a.png"]),
    "size not the file's": (_size_not_the_files,
                            ["image 1: width x height 32x24 but", "a.png is 24x20"]),
    "not an image": (_not_an_image, ["a.png: cannot read image"]),
    "missing image file": (_missing_file, ["image 7", "gone.png"]),
    "invalid json": (_invalid_json, ["not valid JSON", "line 3"]),
    "bbox of 3 numbers": (lambda r: make_dataset(r, [ann(41, 1, [1, 2, 3])]),
                          ["annotation 41", "bbox must be 4 numbers, got [1, 2, 3]"]),
    "bbox as a string": (lambda r: make_dataset(r, [ann(42, 1, "1 2 3 4")]),
                         ["annotation 42", "bbox must be 4 numbers"]),
    "bbox with NaN": (lambda r: make_dataset(r, [ann(45, 1, [1, 2, float("nan"), 4])]),
                      ["annotation 45", "bbox"]),
    "unknown image": (lambda r: make_dataset(r, [ann(43, 999, [1, 2, 3, 4])]),
                      ["annotation 43", "unknown image 999"]),
    "unknown category": (lambda r: make_dataset(r, [ann(44, 1, [1, 2, 3, 4], 555)]),
                         ["annotation 44", "unknown category 555"]),
    "image of width 0": (_zero_width, ["image 3", "'width' must be a positive int, got 0"]),
    "missing annotations list": (_no_annotations, ["missing 'annotations' list"]),
}


@pytest.mark.parametrize("case", list(BAD_DATASETS))
def test_bad_dataset_is_one_line_error(tmp_path: Path, case: str) -> None:
    build, expected = BAD_DATASETS[case]
    path, image_dir = build(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        clean_coco(path, image_dir, 0)
    message = str(info.value)
    assert "\n" not in message
    assert "instances.json" in message
    for part in expected:
        assert part in message


def _write_params(tmp_path: Path, train: tuple[Path, Path], val: tuple[Path, Path]) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({  # JSON is valid YAML
        "seed": 0,
        "data": {"source": "coco", "coco": {
            "train_annotations": str(train[0]), "train_images": str(train[1]),
            "val_annotations": str(val[0]), "val_images": str(val[1]), "max_images": 2}},
        "tracking": {"enabled": False},
    }))
    return params


def test_prepare_stage_end_to_end_on_coco(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    images = [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 24} for i in (1, 2, 3)]
    categories = [{"id": 3, "name": "cat"}, {"id": 18, "name": "dog"}]
    train = make_dataset(tmp_path / "train", [
        ann(10, 1, [1, 1, 8, 8], 3), ann(11, 1, [25, 1, 20, 8], 18),   # second one clipped
        ann(12, 2, [50, 50, 4, 4], 3), ann(13, 3, [1, 1, 8, 8], 18),   # outside; image 3 not kept
    ], images=images, categories=categories, name="instances_train.json")
    val = make_dataset(tmp_path / "val", [ann(20, 2, [4, 4, 30, 10], 18, iscrowd=1)],
                       images=images[:2], categories=categories, name="instances_val.json")
    out = tmp_path / "prepared"
    from stages import prepare as prepare_stage  # the repo root is not a package dir

    params = _write_params(tmp_path, train, val)
    assert prepare_stage.main(["--params", str(params), "--out", str(out)]) == 0
    assert "prepared 2 train / 2 val images" in capsys.readouterr().out

    train_json = json.loads((out / "train.json").read_text())
    val_json = json.loads((out / "val.json").read_text())
    assert [im["id"] for im in train_json["images"]] == [1, 2]
    assert sorted(a["id"] for a in train_json["annotations"]) == [10, 11]
    assert [a["id"] for a in val_json["annotations"]] == [20]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["source"] == "coco"
    assert stats["train"]["dropped_boxes"] == {"clipped": 1, "degenerate": 0, "outside": 1}
    assert stats["val"]["dropped_boxes"] == {"clipped": 1, "degenerate": 0, "outside": 0}
    assert stats["train"]["images"] == 2 and stats["train"]["instances"] == 2
    assert stats["train"]["images_without_annotations"] == 1
    assert stats["val"]["crowd"] == 1
    assert stats["train"]["instances_per_category"] == {"cat": 1, "dog": 1}
    tensor, target = CocoDetection(out / "train.json")[0]
    assert tuple(tensor.shape) == (3, 24, 32)
    assert target["labels"].tolist() == [1, 2]


def test_a_validation_image_that_is_a_training_image_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same json for both splits: every validation image is trained on."""
    train = make_dataset(tmp_path / "train", [ann(1, 1, [1, 1, 8, 8])])
    out = tmp_path / "prepared"
    argv = ["--params", str(_write_params(tmp_path, train, train)), "--out", str(out)]
    from stages import prepare as prepare_stage

    assert cli.run(prepare_stage.main, argv) == 2
    assert capsys.readouterr().err == (
        "error: data.coco: train and val: 1 of the 1 validation images are training images "
        f"too (first: {(train[1] / 'a.png').resolve()})\n")
    assert not (out / "train.json").exists()


def test_prepare_stage_bad_dataset_exits_2_without_writing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = make_dataset(tmp_path / "train", [ann(1, 1, [1, 1, 8, 8])], name="instances_train.json")
    val = make_dataset(tmp_path / "val", [ann(77, 5, [1, 1, 8, 8])], name="instances_val.json")
    out = tmp_path / "prepared"
    argv = ["--params", str(_write_params(tmp_path, train, val)), "--out", str(out)]
    from stages import prepare as prepare_stage

    assert cli.run(prepare_stage.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: ") and "instances_val.json" in err
    assert "annotation 77 points to unknown image 5" in err
    assert not (out / "train.json").exists()
    assert not (out / "stats.json").exists()
