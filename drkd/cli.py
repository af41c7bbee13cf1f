"""Shared entry-point plumbing for the stage scripts: the training stages' options, and how a
failed stage ends."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

from drkd.config import NonFiniteLoss, UserError

NON_FINITE_HINT = (
    "hint: the usual causes are a learning rate too high (train.lr, train.warmup_steps) or "
    "distillation loss weights too large (distill.w_*); with AMP on CUDA, try train.amp: off"
)


def training_arguments(description: str | None) -> argparse.ArgumentParser:
    """The options of every training stage (train_teacher, train_student, distill)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--out", required=True, help="model checkpoint to write")
    parser.add_argument("--history", required=True, help="loss history CSV to write")
    parser.add_argument(
        "--work-dir", required=True, help="resumable per-epoch state (not a DVC out)"
    )
    return parser


def _terminated(signum: int, _: object) -> None:
    raise SystemExit(128 + signum)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """``main(argv)``'s exit code. Bad input (UserError) ends in one ``error:`` line and exit
    code 2; a loss gone NaN/inf (a setting that diverges) in its one-line message, a hint and
    exit code 1. Anything else is a bug and keeps its traceback. A SIGTERM (a queue or a
    scheduler stopping the stage) unwinds like an error, exit code 143: the MLflow run ends
    FAILED instead of staying RUNNING, and no half-written file is left."""
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLoss as err:
        print(f"error: {err}\n{NON_FINITE_HINT}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
