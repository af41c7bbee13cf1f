"""Export a trained detector (teacher, student or distilled student) to ONNX, checked against
PyTorch with ONNX Runtime on real validation images.

    python -m stages.export models/student_drkd.pt --out models/student_drkd.onnx \
        [--data data/prepared] [--check-images 20] [--box-tol 0.01] [--score-tol 1e-4]

The check runs both on the first --check-images validation images and fails (one error line)
unless every image gives the same number of detections and the same labels, boxes within
--box-tol pixels and scores within --score-tol. drkd.export says what the ONNX graph takes and
returns, and what torchvision's detection export does not support.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from drkd import cli
from drkd.checkpoint import load_detector
from drkd.config import UserError
from drkd.data.coco import CocoDetection
from drkd.data.transforms import eval_transforms
from drkd.export import OPSET, compare_onnx, export_onnx
from drkd.files import atomic_path, require_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a model checkpoint (models/*.pt)")
    parser.add_argument("--format", choices=["onnx"], default="onnx")
    parser.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--data", default="data/prepared", type=Path)
    parser.add_argument("--check-images", type=int, default=20)
    parser.add_argument("--box-tol", type=float, default=0.01, help="pixels")
    parser.add_argument("--score-tol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    require_files([args.data / "val.json"])
    model, _ = load_detector(args.checkpoint)
    val = CocoDetection(args.data / "val.json", eval_transforms())
    count = min(args.check_images, len(val))
    images = [val[i][0].as_subclass(torch.Tensor) for i in range(max(count, 1))]
    with atomic_path(args.out) as tmp:
        export_onnx(model, images[0], tmp)
        report = compare_onnx(model, tmp, images[:count])
        bad = (report["mismatched_images"] or report["max_box_diff_px"] > args.box_tol
               or report["max_score_diff"] > args.score_tol)
        if bad:  # nothing is written: the temporary file goes with the error
            raise UserError(f"{args.out}: ONNX Runtime differs from PyTorch on {args.data}: "
                            f"{report}")
    print(f"{args.out}: ONNX opset {OPSET}; ONNX Runtime vs PyTorch on {report['images']} "
          f"validation images ({report['detections']} detections): same counts and labels, "
          f"boxes within {report['max_box_diff_px']:.2g} px, scores within "
          f"{report['max_score_diff']:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
