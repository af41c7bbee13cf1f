"""Shared entry-point plumbing for the stage scripts."""

from __future__ import annotations

import sys
from collections.abc import Callable

from drkd.config import ConfigError

# Bad input (params, data, checkpoints) is reported as one line, not a traceback.
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, KeyError)


def run(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
