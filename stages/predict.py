"""Run a trained detector (teacher, student or distilled student) on images.

    python -m stages.predict CHECKPOINT INPUT [INPUT ...] --out detections.json \
        [--draw DIR] [--score-thresh 0.3] [--batch-size 1]

INPUT: image files, folders of images, or a prepared COCO-format split (a .json such as
data/prepared/val.json). Writes the detections in COCO result format (image_id, category_id,
bbox [x, y, w, h], score: what pycocotools' loadRes reads), each with its file_name and
category_name; with --draw, every image with its boxes above --score-thresh. One image a batch
by default, so an image's detections do not depend on which images share its batch (and equal
the served model's); `--batch-size` of evaluate.batch_size reproduces what `evaluate` scored.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from drkd import cli
from drkd.checkpoint import check_categories, load_detector
from drkd.data.coco import CocoDetection
from drkd.data.transforms import eval_transforms
from drkd.devices import pick_device
from drkd.evaluation import predict
from drkd.files import write_json
from drkd.predict import draw, image_files, named, split_of_images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a model checkpoint (models/*.pt)")
    parser.add_argument("inputs", nargs="+", type=Path, help="images, folders or a split .json")
    parser.add_argument("--out", required=True, type=Path, help="detections json to write")
    parser.add_argument("--draw", type=Path, help="folder for the images with boxes drawn")
    parser.add_argument("--score-thresh", type=float, default=0.3, help="for --draw")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images a batch (a batch is padded to its largest image)")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be positive")
    model, state = load_detector(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        given_split = len(args.inputs) == 1 and args.inputs[0].suffix.lower() == ".json"
        if given_split:  # read as the dataset reads it (as evaluate does)
            annotation_file = args.inputs[0]
        else:  # photos: as they are displayed (EXIF orientation applied), as served
            files = image_files(args.inputs)
            annotation_file = split_of_images(files, state["category_ids"],
                                              state["category_names"], Path(tmp) / "images.json")
        split = CocoDetection(annotation_file, eval_transforms(), upright=not given_split)
        check_categories(Path(args.checkpoint), state, split)
        detections, _ = predict(model, split, args.batch_size, pick_device())
        write_json(named(detections, split), args.out)
        drawn = draw(split, detections, args.draw, args.score_thresh) if args.draw else 0
    print(f"{args.out}: {len(detections)} detections on {len(split)} images"
          + (f"; {drawn} drawn in {args.draw}" if args.draw else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
