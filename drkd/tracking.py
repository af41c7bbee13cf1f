"""MLflow tracking: with drkd/serving.py (the model MLflow runs), the only module of ``drkd/``
that imports mlflow.

Every stage run is one MLflow run in one experiment, tagged with the git commit,
the DVC stage, the data hash and a pipeline id shared by all stages of one
``dvc repro``. A stage that raises ends its run FAILED. With tracking disabled
(or on a non-zero DDP rank) every method is a no-op and results are unchanged.

What MLflow 3 shows of a run, filled the way its UI expects:
- the prepared json files a stage reads are run inputs (``mlflow.log_input`` of a
  metadata-only dataset named after the file, digest = the file's md5): the runs
  table's Dataset column;
- a trained detector is a pyfunc LoggedModel output by its training run
  (``drkd.serving``: the checkpoint as its artifact, this package as its code, a
  signature and an input example): the Models column, `mlflow.pyfunc.load_model` and
  `mlflow models serve`. It is tagged with the checkpoint's md5, so the evaluate run of
  the same file finds it and logs its metrics with ``model_id``: the model page lists
  them, and a metric leads back to the weights; the distilled student is registered in
  the Model Registry (``tracking.registered_model``, alias ``candidate``);
- the experiment carries ``mlflow.experimentKind = custom_model_development``
  (model training, not GenAI).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from drkd.config import Params, TrackingConfig, flatten, to_dict
from drkd.files import sqlite_lock_file

PIPELINE_ENV = "DRKD_PIPELINE_ID"
# MLflow 3's experiment kind: the tag its UI's experiment-kind selector writes;
# "genai_development" is the other kind. Set only where the experiment has none, so a kind
# chosen in the UI stays.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
CHECKPOINT_TAG = "checkpoint_md5"  # on a LoggedModel: the md5 of the checkpoint file it holds


def tracking_uri(cfg: TrackingConfig, root: Path | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else params' tracking.uri, else sqlite:///<root>/mlflow.db."""
    return (
        os.environ.get("MLFLOW_TRACKING_URI")
        or cfg.uri
        or f"sqlite:///{((root or Path.cwd()) / 'mlflow.db').resolve()}"
    )


def git_commit() -> str:
    """HEAD, with "-dirty" when tracked files differ from it; DVC's lock files do not count
    (DVC rewrites them as a pipeline runs: every stage after the first would read dirty)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
             ":(exclude,glob)**/dvc.lock"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def mlflow_name(name: str) -> str:
    """A name (category, model, checkpoint) as MLflow takes it in a metric name and as a
    LoggedModel's name, the stricter of the two: letters, digits, ``_`` and ``-``; anything
    else becomes ``_``."""
    return re.sub(r"[^\w\-]", "_", name)


def data_hash(data: Path | None) -> str:
    """md5 over the annotation files of prepared folder ``data``, both splits (what a stage's
    result depends on); of nothing when ``data`` is None."""
    digest = hashlib.md5()
    for file in [data / "train.json", data / "val.json"] if data else []:
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def file_md5(path: Path) -> str:
    """md5 of one file (hex): the digest of a dataset or checkpoint, as ``md5sum`` prints it."""
    digest = hashlib.md5()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):  # checkpoints run to hundreds of MB
            digest.update(chunk)
    return digest.hexdigest()


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
    """Thin handle over the active MLflow run (or nothing when tracking is off): a stage's run,
    or a tuning worker's with its trials' nested runs."""

    def __init__(self, mlflow: Any = None) -> None:
        self._mlflow = mlflow

    @property
    def active(self) -> bool:
        return self._mlflow is not None

    def log_metrics(
        self,
        metrics: dict[str, float],
        step: int | None = None,
        model_id: str | None = None,
        dataset: Any = None,
    ) -> None:
        """Log metrics at ``step``; with ``model_id`` (and the ``dataset`` from
        :meth:`log_dataset` they were measured on) they are also the metrics of that model."""
        if self._mlflow is not None:
            clean = {k.replace("@", "_"): float(v) for k, v in metrics.items()}
            self._mlflow.log_metrics(clean, step=step, model_id=model_id, dataset=dataset)

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if self._mlflow is not None and Path(path).exists():
            self._mlflow.log_artifact(str(path), artifact_path=folder)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags(tags)

    def log_params(self, values: dict[str, Any]) -> None:
        if self._mlflow is not None:
            self._mlflow.log_params(values)

    # A tuning worker's run (``parent_run``) holds one nested run per trial.
    def start_trial(self, number: int) -> None:
        if self._mlflow is not None:
            self._mlflow.start_run(run_name=f"trial-{number}", nested=True,
                                   tags={"trial": str(number), "dvc_stage": "tune"})

    def end_trial(self, state: str, seconds: float, reason: str) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags({"state": state, "fail_reason": reason[:5000]})
            self._mlflow.log_metric("duration_s", seconds)
            status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED")
            self._mlflow.end_run(status=status)

    def log_dataset(self, path: Path, context: str) -> Any:
        """Record a prepared json file as an input of this run (``context``: training,
        evaluation); returns the MLflow dataset (None when tracking is off). Only its name,
        location and md5 are stored: the file itself is DVC's."""
        if self._mlflow is None:
            return None
        mlflow = self._mlflow
        source = mlflow.data.sources.LocalArtifactDatasetSource(str(path.resolve()))
        dataset = mlflow.data.meta_dataset.MetaDataset(
            source, name=path.stem, digest=file_md5(path)
        )
        mlflow.log_input(dataset, context=context)
        return dataset

    def log_model(self, name: str, checkpoint: Path, config: dict[str, Any],
                  example_image: Path | None = None) -> str | None:
        """Record ``checkpoint`` as a LoggedModel output by this run, an MLflow pyfunc model
        (``drkd.serving``: `mlflow.pyfunc.load_model` and `mlflow models serve` run it, with
        this package as its code); returns its id. Its params are ``config`` flattened; with
        ``example_image`` it carries an input example and the signature inferred from it."""
        if self._mlflow is None:
            return None
        import pandas as pd
        import torch
        import torchvision

        example = None
        if example_image is not None:  # the `image` column: base64 of an image file's bytes
            encoded = base64.b64encode(example_image.read_bytes()).decode("ascii")
            example = pd.DataFrame({"image": [encoded]})
        info = self._mlflow.pyfunc.log_model(
            name=mlflow_name(name),
            python_model=str(Path(__file__).resolve().parent / "serving.py"),  # from code
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(__file__).resolve().parent)],  # the drkd package
            # Exactly what runs it; nothing inferred (inference would import the model).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"torchvision=={torchvision.__version__.split('+')[0]}",
                              f"ruamel.yaml=={metadata.version('ruamel.yaml')}",
                              "pandas", "pillow", "numpy"],
            input_example=example,
            metadata={"model_config": config},
            params={k: str(v)[:500] for k, v in flatten(config).items()},
            tags={CHECKPOINT_TAG: file_md5(checkpoint)},
            model_type="detector",
        )
        return str(info.model_id)

    def register(self, model_id: str | None, name: str, alias: str) -> None:
        """Register a logged model as a new version of ``name`` in the Model Registry and point
        ``alias`` at it (`models:/<name>@<alias>`)."""
        if self._mlflow is None or model_id is None or not name:
            return
        version = self._mlflow.register_model(f"models:/{model_id}", name)
        self._mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)

    def find_model(self, checkpoint: Path) -> str | None:
        """The id of the newest READY LoggedModel of this experiment holding exactly the bytes
        of ``checkpoint`` (DVC restores a file's bytes, so a cached checkpoint still leads to
        the run that trained it); None when there is none or tracking is off."""
        if self._mlflow is None:
            return None
        mlflow = self._mlflow
        found = mlflow.search_logged_models(
            experiment_ids=[mlflow.active_run().info.experiment_id],
            filter_string=f"tags.{CHECKPOINT_TAG} = '{file_md5(checkpoint)}'",
            order_by=[{"field_name": "creation_time", "ascending": False}],
            output_format="list",
        )
        # Status checked here: `status = 'READY'` in the filter matches nothing on a sqlite
        # store (MLflow 3.17 compares the name with the stored enum number).
        ready = [model for model in found if model.status == "READY"]
        # Two runs can write equal bytes (the smoke preset's teacher and student are one
        # recipe): the model logged under this file's name first, newest first within each.
        ready.sort(key=lambda model: model.name != mlflow_name(checkpoint.stem))
        return str(ready[0].model_id) if ready else None

    def log_model_input(self, model_id: str | None) -> None:
        """Record a logged model this run reads (the teacher of a distillation run)."""
        if self._mlflow is not None and model_id is not None:
            self._mlflow.log_input(model=self._mlflow.entities.LoggedModelInput(model_id))


def open_experiment(cfg: TrackingConfig) -> Any:
    """Point MLflow at ``cfg``'s store and experiment, marked as a model-training experiment
    (unless it already has a kind); returns the mlflow module."""
    import mlflow

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    # Two processes opening a new sqlite store at once (compare cells side by side) would both
    # create its tables, and one would fail: the first creates them under a lock.
    lock_file = sqlite_lock_file(uri)
    with lock_file.open("a") if lock_file else contextlib.nullcontext() as lock:
        if lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed, or when the process dies
        experiment = mlflow.set_experiment(cfg.experiment)
        if EXPERIMENT_KIND_TAG not in experiment.tags:
            mlflow.set_experiment_tag(EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return mlflow


@contextmanager
def stage_run(
    cfg: TrackingConfig,
    stage: str,
    params: dict[str, Any],
    data: Path | None = None,
    enabled: bool = True,
    system_metrics: bool = False,
    tags: dict[str, str] | None = None,
) -> Iterator[StageRun]:
    """Open the MLflow run of one stage; ``enabled=False`` (e.g. DDP rank > 0) opens nothing.
    ``tags``: more tags beside the lineage every stage run carries.

    ``system_metrics`` (the training stages): MLflow samples CPU, memory, disk and GPU into
    ``system/*`` metrics while the run is open, if ``tracking.system_metrics`` is on."""
    if not (cfg.enabled and enabled):
        yield StageRun()
        return
    mlflow = open_experiment(cfg)
    lineage = {
        "git_commit": git_commit(),
        "dvc_stage": stage,
        "data_hash": data_hash(data),
        "pipeline_id": pipeline_id(),
    }
    with mlflow.start_run(
        run_name=stage, tags={**lineage, **(tags or {})},
        log_system_metrics=system_metrics and cfg.system_metrics,
    ):
        flat = {k: ("" if v is None else str(v))[:500] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # log_params caps a batch at 100
            mlflow.log_params(dict(items[i : i + 100]))
        yield StageRun(mlflow)


@contextmanager
def parent_run(
    params: Params, study_name: str, url: str, n_trials: int, data: Path
) -> Iterator[StageRun]:
    """The MLflow run of this invocation (this worker); trials nest under it."""
    logged = {"tune": to_dict(params.tune), "storage": url, "n_trials": n_trials}
    with stage_run(params.tracking, "tune", logged, data,
                   tags={"study": study_name}) as run:
        yield run
