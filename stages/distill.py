"""DVC stage `distill`: the student of params.yaml distilled from a teacher checkpoint.

    python -m stages.distill --teacher models/teacher.pt --out ... --history ... --work-dir ...

The student trains as `train_student` trains it (recipe, budget, initial weights: one code
path, stages.train.train), wrapped in a Distiller (params `distill`); only the student is
saved, plus with ``--modules-out`` the training-only modules (DRKD's relation plots).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

from torch import nn

from drkd import cli
from drkd.checkpoint import load_detector, save_atomic
from drkd.config import UserError, load_params
from drkd.data.coco import CocoDetection
from drkd.distiller import Distiller
from stages.train import Distillation, arguments, train


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--teacher", required=True, help="teacher checkpoint to distil from")
    parser.add_argument("--modules-out", help="save the training-only modules (DRKD's relations)")
    args = parser.parse_args(argv)
    params = load_params(args.params)

    def wrap(student: nn.Module, dataset: CocoDetection) -> nn.Module:
        # Loading the teacher leaves the RNG alone (drkd.checkpoint), so the Distiller's
        # modules start as a tuning trial's do (tests/test_tune.py).
        teacher, state = load_detector(args.teacher)
        if state["category_ids"] != dataset.category_ids:
            raise UserError(f"{args.teacher}: trained on other categories than {args.data}")
        return Distiller(student, teacher, params.distill)

    def save(trained: nn.Module) -> None:
        if args.modules_out:
            save_atomic(cast(Distiller, trained).modules_checkpoint(), args.modules_out)

    return train(args, params, "student", Distillation(Path(args.teacher), wrap, save))


if __name__ == "__main__":
    sys.exit(cli.run(main))
