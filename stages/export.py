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

from drkd import cli
from drkd.export import OPSET, export_checked


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
    if args.check_images < 1:
        parser.error("--check-images must be at least 1: the file is written only once checked")
    report = export_checked(Path(args.checkpoint), args.data, args.out, args.check_images,
                            args.box_tol, args.score_tol)
    print(f"{args.out}: ONNX opset {OPSET}; ONNX Runtime vs PyTorch on {report['images']} "
          f"validation images ({report['detections']} detections): same counts and labels, "
          f"boxes within {report['max_box_diff_px']:.2g} px, scores within "
          f"{report['max_score_diff']:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
