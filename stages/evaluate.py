"""DVC stage `evaluate@<NAME>`: one detector checkpoint -> COCO metrics and raw detections on val.

``--metrics`` (``eval/NAME/metrics.json``) holds AP, AP50, AP75, APs, APm, APl, AR100
(fractions 0..1, -1 where val has no ground truth of that size), ``per_class_AP`` {category
name: AP}, ``parameters`` and ``inference_ms_per_image``. ``--headline``
(``metrics/NAME.json``, the DVC metrics file) holds the first seven only: what
``dvc metrics show`` compares.

``inference_ms_per_image`` is latency, not throughput: the mean wall time of one forward
pass at batch size 1 (the detector's own resize/normalise and postprocessing included, data
loading excluded, CUDA synchronised) over the first ``evaluate.timing_images`` val images,
after two untimed warm-up passes (torch.utils.benchmark.Timer). With ``timing_images: 0`` it is
the batched mean from the metrics pass instead (``evaluate.batch_size`` images per forward).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drkd import cli
from drkd.config import load_params
from drkd.evaluation import evaluate_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help="model name (teacher, student, ...)")
    parser.add_argument("--checkpoint", required=True, help="model checkpoint to evaluate")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--metrics", required=True, help="metrics json to write (all of them)")
    parser.add_argument("--headline", help="json of the COCO summary numbers alone to write")
    parser.add_argument("--detections", required=True, help="raw COCO detections json to write")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    print(evaluate_checkpoint(
        load_params(args.params), args.name, Path(args.checkpoint), Path(args.data),
        Path(args.metrics), Path(args.detections), args.headline and Path(args.headline)))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
