"""DVC stages `train_teacher` and `train_student`: one detector -> checkpoint.

    python -m stages.train teacher|student --out ... --history ... --work-dir ...

The baseline student trains with the recipe, budget and initial weights distillation uses
(``drkd.recipe.train_detector``), without the teacher.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from drkd import cli
from drkd.config import load_params
from drkd.recipe import train_detector


def arguments(description: str | None) -> argparse.ArgumentParser:
    """The options of every training stage."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", required=True, help="model checkpoint to write")
    parser.add_argument("--history", required=True, help="loss history CSV to write")
    parser.add_argument(
        "--work-dir", required=True, help="resumable per-epoch state (not a DVC out)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("which", choices=["teacher", "student"])
    args = parser.parse_args(argv)
    train_detector(load_params(args.params), args.which, Path(args.data), Path(args.out),
                   Path(args.history), Path(args.work_dir))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
