"""Atomic file writes: write a temp file in the same folder, then rename it over the target,
so a reader (or a killed run) never leaves half a file behind."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from drkd.config import UserError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path (same folder and suffix) to write; flushed to disk and renamed to
    ``path`` on success, removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its mode 0600 would stay with the renamed file. Created like a
    # plain open() (0666 less the umask), so outputs stay readable by whoever could read them.
    tmp = path.with_name(f".{path.stem}.{secrets.token_hex(6)}{path.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        # On disk before the rename: after a power loss the name holds the old or the new
        # content, never an empty file (the rename may reach the disk before the data).
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def require_files(paths: list[Path]) -> None:
    """One UserError naming the first missing input, before any work starts."""
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: file not found (run the stage that writes it first)")


def require_fresh(path: Path, expected: Any, stale: str) -> None:
    """``path``, a JSON file a cheap DVC stage wrote for a later stage to depend on, must hold
    ``expected`` (what that stage trains with); else one UserError: "PATH: stale, ``stale``"."""
    require_files([path])
    if json.loads(path.read_text()) != expected:
        raise UserError(f"{path}: stale, {stale}")


def write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(data: Any, path: str | Path, indent: int = 2) -> None:
    """Deterministic json: sorted keys, a final newline."""
    write_text(json.dumps(data, sort_keys=True, indent=indent) + "\n", path)


def sqlite_lock_file(url: str) -> Path | None:
    """``<db>.lock`` beside the file of a ``sqlite:///<db>`` URL, which processes flock to take
    turns at what sqlite cannot make atomic (creating a new store's tables, counting then
    creating a trial); None for any other URL and for an in-memory database. A database in a
    folder that does not exist is a UserError (sqlite would not create the folder either)."""
    db = url.removeprefix("sqlite:///")
    if db == url or db in ("", ":memory:"):
        return None
    lock = Path(f"{db}.lock")
    if not lock.parent.is_dir():
        raise UserError(f"{url}: the folder {lock.parent} does not exist")
    return lock
