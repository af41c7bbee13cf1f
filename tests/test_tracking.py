"""MLflow tracking against a real sqlite store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from drkd.config import TrackingConfig
from drkd.tracking import PIPELINE_ENV, pipeline_id, stage_run, tracking_uri


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(PIPELINE_ENV, "pipe-1")
    return uri


def _runs(uri: str) -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["drkd"], output_format="list")


def test_stage_run_logs_params_metrics_tags_and_artifacts(store: str, tmp_path: Path) -> None:
    data = tmp_path / "train.json"
    data.write_text("{}")
    artifact = tmp_path / "history.csv"
    artifact.write_text("step,loss\n1,0.5\n")
    params = {"teacher": {"train": {"lr": 0.001, "milestones": [8, 11]}}}
    with stage_run(TrackingConfig(), "train_teacher", params, [data]) as run:
        assert run.active
        run.log_metrics({"loss": 0.5, "classification": 0.3}, step=1)
        run.log_metrics({"loss": 0.25}, step=2)
        run.log_artifact(artifact)
    (found,) = _runs(store)
    assert found.info.status == "FINISHED"
    assert found.data.params["teacher.train.lr"] == "0.001"
    assert found.data.params["teacher.train.milestones"] == "[8, 11]"
    assert found.data.metrics["loss"] == 0.25
    tags = found.data.tags
    assert tags["dvc_stage"] == "train_teacher" and tags["pipeline_id"] == "pipe-1"
    assert len(tags["data_hash"]) == 12 and tags["git_commit"]
    history = mlflow.MlflowClient().get_metric_history(found.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25)]
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(found.info.run_id)] == [
        "history.csv"
    ]


def test_a_stage_that_raises_marks_its_run_failed(store: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run(TrackingConfig(), "train_student", {}):
            raise RuntimeError("boom")
    (found,) = _runs(store)
    assert found.info.status == "FAILED"


def test_disabled_tracking_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with stage_run(TrackingConfig(enabled=False), "prepare", {"a": 1}) as run:
        assert not run.active
        run.log_metrics({"loss": 1.0}, step=0)
        run.log_artifact(tmp_path)
    with stage_run(TrackingConfig(), "prepare", {"a": 1}, enabled=False) as run:  # DDP rank > 0
        assert not run.active
    assert list(tmp_path.iterdir()) == []


def test_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking_uri(TrackingConfig(uri="http://127.0.0.1:5000"), tmp_path).startswith("http")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking_uri(TrackingConfig(uri="http://127.0.0.1:5000")) == "sqlite:///elsewhere.db"


def test_pipeline_id_from_env_or_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PIPELINE_ENV, "given")
    assert pipeline_id() == "given"
    monkeypatch.delenv(PIPELINE_ENV)
    first, second = pipeline_id(), pipeline_id()
    assert first.startswith("adhoc-") and first != second  # not under dvc: one id per stage
