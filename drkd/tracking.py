"""MLflow tracking: the only module of ``drkd/`` that imports mlflow.

Every stage run is one MLflow run in one experiment, tagged with the git commit,
the DVC stage, the data hash and a pipeline id shared by all stages of one
``dvc repro``. A stage that raises ends its run FAILED. With tracking disabled
(or on a non-zero DDP rank) every method is a no-op and results are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from drkd.config import TrackingConfig, flatten

PIPELINE_ENV = "DRKD_PIPELINE_ID"


def tracking_uri(cfg: TrackingConfig, root: Path | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else params' tracking.uri, else sqlite:///<root>/mlflow.db."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or cfg.uri
        or f"sqlite:///{((root or Path.cwd()) / 'mlflow.db').resolve()}"
    )


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def mlflow_name(name: str) -> str:
    """A name (category, model) as an MLflow metric-name fragment: MLflow accepts only
    letters, digits, ``_ - . space /``; anything else becomes ``_``."""
    return re.sub(r"[^\w\-. /]", "_", name)


def data_hash(files: Sequence[Path]) -> str:
    """md5 over the prepared annotation files (what a stage's result depends on)."""
    digest = hashlib.md5()
    for file in sorted(files):
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def pipeline_id() -> str:
    """One id for all stages of one ``dvc repro``.

    ``make repro`` exports $DRKD_PIPELINE_ID; under a bare ``dvc repro`` we use
    the pid and start time of the ancestor dvc process (Linux /proc), so the
    stages it launches still share an id; otherwise a fresh id per stage.
    """
    if os.environ.get(PIPELINE_ENV):
        return os.environ[PIPELINE_ENV]
    pid = os.getppid()
    try:
        for _ in range(8):
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"dvc" in cmdline and b"repro" in cmdline or b"dvc exp" in cmdline:
                fields = stat.rsplit(")", 1)[1].split()
                return f"dvc-{pid}-{fields[19]}"
            pid = int(stat.rsplit(")", 1)[1].split()[1])
            if pid <= 1:
                break
    except (OSError, ValueError, IndexError):
        pass
    return f"adhoc-{uuid.uuid4().hex[:12]}"


class StageRun:
    """Thin handle over the active MLflow run (or nothing when tracking is off)."""

    def __init__(self, mlflow: Any = None) -> None:
        self._mlflow = mlflow

    @property
    def active(self) -> bool:
        return self._mlflow is not None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self._mlflow is not None:
            clean = {k.replace("@", "_"): float(v) for k, v in metrics.items()}
            self._mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags(tags)


@contextmanager
def stage_run(
    cfg: TrackingConfig,
    stage: str,
    params: dict[str, Any],
    data_files: Sequence[Path] = (),
    enabled: bool = True,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage; ``enabled=False`` (e.g. DDP rank > 0) opens nothing."""
    if not (cfg.enabled and enabled):
        yield StageRun()
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.experiment)
    tags = {
        "git_commit": git_commit(),
        "dvc_stage": stage,
        "data_hash": data_hash(data_files),
        "pipeline_id": pipeline_id(),
    }
    with mlflow.start_run(run_name=stage, tags=tags):
        flat = {k: ("" if v is None else str(v))[:500] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # log_params caps a batch at 100
            mlflow.log_params(dict(items[i : i + 100]))
        yield StageRun(mlflow)
