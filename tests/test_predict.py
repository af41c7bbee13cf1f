"""`python -m stages.predict`: a checkpoint and images (files, folders or a split) -> COCO
detections with names, and drawn images; on the validation split exactly what `evaluate`
scored. The toy detector is made to detect (its classification bias raised), so the
comparisons are over real detections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from conftest import toy_model, toy_params
from drkd import cli
from drkd.checkpoint import model_checkpoint, save_atomic
from drkd.config import UserError
from drkd.data.coco import CocoDetection
from drkd.evaluation import coco_metrics
from drkd.models import build_detector
from drkd.predict import split_of_images
from drkd.serving import decode_image, encode_image
from stages import evaluate, predict


@pytest.fixture(scope="module")
def detector(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy RetinaNet checkpoint whose every anchor scores ~0.9: it detects everywhere."""
    split = CocoDetection(tiny_data / "train.json")
    model = build_detector(toy_model(), split.num_classes)
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.fill_(2.0)
    path = tmp_path_factory.mktemp("detector") / "student.pt"
    save_atomic(model_checkpoint(model, toy_model(), split.category_ids, split.category_names),
                path)
    return path


def test_predictions_on_the_split_are_what_evaluate_scored(
        detector: Path, tiny_data: Path, tmp_path: Path) -> None:
    params = toy_params(tmp_path / "params.yaml", evaluate={"batch_size": 2, "timing_images": 0})
    assert evaluate.main(["student", "--checkpoint", str(detector), "--data", str(tiny_data),
                          "--params", str(params), "--metrics", str(tmp_path / "m.json"),
                          "--detections", str(tmp_path / "scored.json")]) == 0
    assert predict.main([str(detector), str(tiny_data / "val.json"), "--batch-size", "2",
                         "--out", str(tmp_path / "predicted.json")]) == 0
    scored = json.loads((tmp_path / "scored.json").read_text())
    predicted = json.loads((tmp_path / "predicted.json").read_text())
    assert len(scored) > 100  # a detector that detects: the comparison is not of empty lists
    ids = ("image_id", "category_id", "bbox", "score")
    assert [{k: d[k] for k in ids} for d in predicted] == scored
    split = CocoDetection(tiny_data / "val.json")
    names = dict(zip(split.category_ids, split.category_names, strict=True))
    assert all(d["category_name"] == names[d["category_id"]] for d in predicted)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert coco_metrics(tiny_data / "val.json", predicted)["AP"] == metrics["AP"]


def test_a_folder_of_images_and_drawn_boxes(detector: Path, tiny_data: Path,
                                            tmp_path: Path) -> None:
    split = CocoDetection(tiny_data / "val.json")
    folder = tmp_path / "images"
    folder.mkdir()
    for info in split.images[:3]:
        Image.open(split.root / info["file_name"]).save(folder / f"{info['id']}.jpg")
    (folder / "notes.txt").write_text("not an image")  # skipped: not an image suffix
    out, drawn = tmp_path / "d.json", tmp_path / "drawn"
    assert predict.main([str(detector), str(folder), "--out", str(out), "--draw", str(drawn),
                         "--score-thresh", "0.5"]) == 0
    detections = json.loads(out.read_text())
    files = sorted(folder.glob("*.jpg"))
    assert {d["image_id"] for d in detections} == {1, 2, 3}
    assert {d["file_name"] for d in detections} == {str(f.resolve()) for f in files}
    pngs = sorted(drawn.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i}_{f.stem}.png" for i, f in enumerate(files, 1)]
    first = pil_to_tensor(Image.open(pngs[0]).convert("RGB"))
    source = pil_to_tensor(Image.open(files[0]).convert("RGB"))
    assert first.shape == source.shape and (first != source).any()  # boxes were drawn on it


def test_bad_input_is_one_line(detector: Path, tiny_data: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    detections = tmp_path / "detections.json"
    detections.write_text("[]")  # a detections file, not a split
    for argv, message in [
        ([str(tmp_path / "missing.png")], "missing.png: no such file or folder"),
        ([str(broken)], "broken.jpg: not a readable image"),
        ([str(tmp_path / "vall.json")], "vall.json: not found"),
        ([str(detections)], "detections.json: not a COCO-format split"),
        ([str(broken), str(detections)], "detections.json: a split .json is read on its own"),
    ]:
        assert cli.run(predict.main, [str(detector), *argv, "--out", str(tmp_path / "o.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    other = json.loads((tiny_data / "val.json").read_text())
    for category in other["categories"]:
        category["id"] += 100
    for annotation in other["annotations"]:
        annotation["category_id"] += 100
    shifted = tmp_path / "other.json"
    shifted.write_text(json.dumps({**other, "images": [
        {**im, "file_name": str((tiny_data / im["file_name"]).resolve())}
        for im in other["images"]]}))
    with pytest.raises(SystemExit):  # argparse's usage line and exit 2
        predict.main([str(detector), str(tmp_path), "--out", "o.json", "--batch-size", "0"])
    assert "--batch-size must be positive" in capsys.readouterr().err
    with pytest.raises(UserError, match="trained on categories"):
        predict.main([str(detector), str(shifted), "--out", str(tmp_path / "o.json")])
    # The same ids naming other classes (VOC numbers classes in `classes` order): refused too.
    names = [c["name"] for c in other["categories"]]
    renamed = json.loads(shifted.read_text())
    renamed["categories"] = [{**c, "id": c["id"] - 100, "name": n} for c, n in
                             zip(renamed["categories"], names[1:] + names[:1], strict=True)]
    renamed["annotations"] = [{**a, "category_id": a["category_id"] - 100}
                              for a in renamed["annotations"]]
    (tmp_path / "renamed.json").write_text(json.dumps(renamed))
    with pytest.raises(UserError, match="trained on categories"):
        predict.main([str(detector), str(tmp_path / "renamed.json"), "--out",
                      str(tmp_path / "o.json")])
    assert not (tmp_path / "o.json").exists()  # nothing written


def as_uint8(image: torch.Tensor) -> torch.Tensor:
    """A float image in [0, 1] (what the detector is fed) back to its 8-bit levels."""
    return (image * 255).round().to(torch.uint8)


# EXIF orientation -> how to store a picture so that the orientation displays it as drawn:
# the inverse of what the orientation does (2 mirrors, 3 turns 180, 6 turns 90 clockwise, 8 90
# counter-clockwise), written out here rather than taken from PIL's exif_transpose.
STORED_AS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize(("orientation", "size"), [(6, (40, 96)), (3, (64, 40)), (2, (64, 40)),
                                                   (6, (48, 48)), (8, (48, 48))])
def test_a_photo_is_read_as_displayed(orientation: int, size: tuple[int, int],
                                      tmp_path: Path) -> None:
    """A phone photo with an EXIF orientation (a turned one of a new size, a turn or mirror
    that keeps the size, a square): predict and the served model both see the picture as it
    is displayed, pixel for pixel."""
    shown = Image.fromarray(
        torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8).numpy())
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.png"  # lossless, so pixels compare exactly
    shown.transpose(STORED_AS[orientation]).save(path, exif=exif)
    split = split_of_images([path], [1], ["a"], tmp_path / "split.json")
    info = json.loads(split.read_text())["images"][0]
    assert (info["width"], info["height"]) == size
    expected = pil_to_tensor(shown)
    image, _ = CocoDetection(split, upright=True)[0]  # uint8, before the float transforms
    assert torch.equal(image.as_subclass(torch.Tensor), expected)
    assert torch.equal(as_uint8(decode_image(encode_image(path))), expected)


def test_a_16_bit_image_keeps_its_levels(tmp_path: Path) -> None:
    """A 16-bit grayscale image (microscopy, X-ray): its levels scaled to 8 bits, not clipped."""
    levels = torch.arange(0, 65536, 257, dtype=torch.int32).repeat(8, 1)  # 8x256, 0..65535
    path = tmp_path / "cells.png"
    Image.fromarray(levels.numpy().astype("uint16")).save(path)
    with Image.open(path) as stored:
        assert stored.mode.startswith("I")  # PIL reads it as 16-bit integers
    split = split_of_images([path], [1], ["a"], tmp_path / "split.json")
    image, _ = CocoDetection(split, upright=True)[0]
    expected = (levels // 257).to(torch.uint8).expand(3, -1, -1)  # 257 * k -> k
    assert torch.equal(image.as_subclass(torch.Tensor), expected)
    assert torch.equal(as_uint8(decode_image(encode_image(path))), expected)
