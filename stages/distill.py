"""DVC stage `distill`: the student of params.yaml distilled from a teacher checkpoint.

    python -m stages.distill --teacher models/teacher.pt --out ... --history ... --work-dir ...
                             [--modules-out models/drkd_modules.pt] [--settings FILE]

The student trains as `train_student` trains it (``drkd.recipe.train_detector``: recipe,
budget, initial weights), wrapped in a Distiller (params `distill`); only the student is saved,
plus with ``--modules-out`` the training-only modules (DRKD's relation plots). ``--settings``
(the stage's DVC dependency, written by `distill_settings`) must hold the `distill` keys the
method reads, as params give them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import cast

from torch import nn

from drkd import cli
from drkd.checkpoint import save_atomic
from drkd.config import DistillConfig, load_params, method_distill, to_dict
from drkd.data.coco import CocoDetection
from drkd.distiller import Distiller, load_teacher
from drkd.files import require_fresh
from drkd.recipe import Distillation, train_detector


def distillation(cfg: DistillConfig, teacher: Path, modules_out: Path | None) -> Distillation:
    """The student wrapped in a Distiller with ``teacher`` (checked against the data's
    categories); rank 0 saves the training-only modules to ``modules_out``."""

    def wrap(student: nn.Module, dataset: CocoDetection) -> nn.Module:
        return Distiller(student, load_teacher(teacher, dataset), cfg)

    def save(trained: nn.Module) -> None:
        if modules_out:
            save_atomic(cast(Distiller, trained).modules_checkpoint(), modules_out)

    return Distillation(teacher, wrap, save)


def main(argv: list[str] | None = None) -> int:
    parser = cli.training_arguments(__doc__)
    parser.add_argument("--teacher", required=True, help="teacher checkpoint to distil from")
    parser.add_argument("--modules-out", help="save the training-only modules (DRKD's relations)")
    parser.add_argument("--settings", help="the method's settings as distill_settings wrote them")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.settings:
        require_fresh(Path(args.settings), method_distill(to_dict(params.distill)),
                      f"not the distill settings of {args.params} "
                      "(dvc repro distill_settings writes them)")
    modules = Path(args.modules_out) if args.modules_out else None
    train_detector(params, "student", Path(args.data), Path(args.out), Path(args.history),
                   Path(args.work_dir), distillation(params.distill, Path(args.teacher), modules))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
