"""DVC stages `train_teacher` and `train_student`: one detector -> checkpoint.

    python -m stages.train teacher|student --out ... --history ... --work-dir ...

The baseline student trains with the recipe, budget and initial weights distillation uses
(``drkd.recipe.train_detector``), without the teacher.
"""

from __future__ import annotations

import sys
from pathlib import Path

from drkd import cli
from drkd.config import load_params
from drkd.recipe import train_detector


def main(argv: list[str] | None = None) -> int:
    parser = cli.training_arguments(__doc__)
    parser.add_argument("which", choices=["teacher", "student"])
    args = parser.parse_args(argv)
    train_detector(load_params(args.params), args.which, Path(args.data), Path(args.out),
                   Path(args.history), Path(args.work_dir))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
