"""MLflow tracking against a real sqlite store."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import mlflow
import pytest

from conftest import toy_params, toy_section
from drkd.config import TrackingConfig
from drkd.tracking import (
    EXPERIMENT_KIND_TAG,
    PIPELINE_ENV,
    git_commit,
    pipeline_id,
    stage_run,
    tracking_uri,
)
from stages import evaluate, train


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
    (tmp_path / "train.json").write_text("{}")  # the prepared folder's one split here
    artifact = tmp_path / "history.csv"
    artifact.write_text("step,loss\n1,0.5\n")
    params = {"teacher": {"train": {"lr": 0.001, "milestones": [8, 11]}}}
    with stage_run(TrackingConfig(), "train_teacher", params, tmp_path) as run:
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
    assert tags["data_hash"] == hashlib.md5(b"{}").hexdigest()[:12] and tags["git_commit"]
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
    data = tmp_path / "train.json"
    data.write_text("{}")
    with stage_run(TrackingConfig(enabled=False), "prepare", {"a": 1}) as run:
        assert not run.active
        run.log_metrics({"loss": 1.0}, step=0, model_id="m-1")
        run.log_artifact(tmp_path)
        assert run.log_dataset(data, "training") is None
        assert run.log_model("student", data, {"arch": "retinanet"}) is None
        assert run.find_model(data) is None
        run.log_model_input("m-1")
    data.unlink()
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


def test_experiment_is_marked_model_training_unless_it_has_a_kind(store: str) -> None:
    """MLflow 3 reads the experiment kind from this tag; a kind chosen in the UI stays."""
    with stage_run(TrackingConfig(), "prepare", {}):
        pass
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("drkd")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    with stage_run(TrackingConfig(), "prepare", {}):
        pass
    tags = client.get_experiment(experiment.experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_logged_checkpoint_is_found_by_its_bytes(store: str, tmp_path: Path) -> None:
    """A later run (distill reading the teacher) finds the model by the checkpoint's md5 and
    records it as an input; other bytes find nothing."""
    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(b"weights")
    with stage_run(TrackingConfig(), "train_teacher", {}) as run:
        model_id = run.log_model("teacher", ckpt, {"arch": "retinanet", "sizes": [1, 2]})
    assert model_id
    with stage_run(TrackingConfig(), "distill", {}) as run:
        assert run.find_model(ckpt) == model_id
        run.log_model_input(run.find_model(ckpt))
        (tmp_path / "other.pt").write_bytes(b"other weights")
        assert run.find_model(tmp_path / "other.pt") is None
    (distill,) = [r for r in _runs(store) if r.data.tags["dvc_stage"] == "distill"]
    distill = mlflow.MlflowClient().get_run(distill.info.run_id)  # search leaves model inputs out
    assert [m.model_id for m in distill.inputs.model_inputs] == [model_id]
    model = mlflow.MlflowClient().get_logged_model(model_id)
    assert model.name == "teacher" and model.params["sizes"] == "[1, 2]"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_train_and_evaluate_link_datasets_model_and_metrics(
    tiny_data: Path, tmp_path: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real train and evaluate stages (toy detector, 4 CPU steps) into a sqlite store, read
    back as the UI reads them: the train run's dataset input, its logged model (the checkpoint
    and its config) and system metrics; the evaluate run's dataset, the same model as its
    input, and the evaluation metrics on that model."""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")  # default 10 s
    params = toy_params(tmp_path / "params.yaml", student=toy_section(fpn_channels=24),
                        evaluate={"batch_size": 2, "timing_images": 0},
                        tracking={"enabled": True, "system_metrics": True})
    ckpt = tmp_path / "models" / "student.pt"
    assert train.main(["student", "--params", str(params), "--data", str(tiny_data),
                       "--out", str(ckpt), "--history", str(tmp_path / "student.csv"),
                       "--work-dir", str(tmp_path / "work")]) == 0
    metrics_file = tmp_path / "eval" / "metrics.json"
    assert evaluate.main(["student", "--checkpoint", str(ckpt), "--data", str(tiny_data),
                          "--metrics", str(metrics_file),
                          "--detections", str(tmp_path / "eval" / "detections.json"),
                          "--params", str(params)]) == 0

    client = mlflow.MlflowClient()
    runs = {r.data.tags["dvc_stage"]: client.get_run(r.info.run_id) for r in _runs(store)}
    trained, evaluated = runs["train_student"], runs["evaluate@student"]

    (train_input,) = trained.inputs.dataset_inputs
    assert train_input.dataset.name == "train"
    assert train_input.dataset.digest == _md5(tiny_data / "train.json")
    assert {t.key: t.value for t in train_input.tags}["mlflow.data.context"] == "training"
    (output,) = trained.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.status == "READY" and logged.source_run_id == trained.info.run_id
    assert logged.name == "student" and logged.tags["checkpoint_md5"] == _md5(ckpt)
    assert logged.params["model_config.fpn_channels"] == "24"
    files = {f.path for f in client.list_logged_model_artifacts(output.model_id)}
    # A pyfunc model: MLmodel, its code (drkd/serving.py and the package), the checkpoint.
    assert {"MLmodel", "artifacts", "code", "serving.py"} <= files, files
    assert {f.path for f in client.list_logged_model_artifacts(output.model_id, "artifacts")} \
        == {"artifacts/student.pt"}
    assert "system/cpu_utilization_percentage" in trained.data.metrics

    assert [(d.dataset.name, d.dataset.digest) for d in evaluated.inputs.dataset_inputs] == [
        ("val", _md5(tiny_data / "val.json"))]
    assert [m.model_id for m in evaluated.inputs.model_inputs] == [output.model_id]
    assert not evaluated.outputs.model_outputs  # found the trained model, logged no copy
    linked = {m.key: m for m in client.get_logged_model(output.model_id).metrics}
    ap = json.loads(metrics_file.read_text())["AP"]
    assert linked["AP"].value == pytest.approx(ap) and linked["AP"].run_id == evaluated.info.run_id
    assert linked["AP"].dataset_name == "val"
    assert {"AP50", "AR100", "parameters"} <= set(linked)
    assert not any(k.startswith("system/") for k in evaluated.data.metrics)  # training only


def test_equal_bytes_of_two_runs_find_the_model_of_the_same_name(store: str,
                                                                 tmp_path: Path) -> None:
    """The smoke preset's teacher and student are one recipe, so one seed writes them byte for
    byte equal: evaluating models/teacher.pt must still find the teacher's model, though the
    student's is newer."""
    teacher, student = tmp_path / "teacher.pt", tmp_path / "student.pt"
    teacher.write_bytes(b"weights")
    student.write_bytes(b"weights")
    with stage_run(TrackingConfig(), "train_teacher", {}) as run:
        teacher_id = run.log_model("teacher", teacher, {})
    with stage_run(TrackingConfig(), "train_student", {}) as run:
        student_id = run.log_model("student", student, {})
    with stage_run(TrackingConfig(), "evaluate@teacher", {}) as run:
        assert teacher_id != student_id
        assert run.find_model(teacher) == teacher_id
        assert run.find_model(student) == student_id
        moved = tmp_path / "copy.pt"  # a copy under another name: the newest of equal bytes
        moved.write_bytes(b"weights")
        assert run.find_model(moved) == student_id


def test_git_commit_is_dirty_for_edits_but_not_for_dvc_lock_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC rewrites dvc.lock after each stage of a run: the later stages' runs must still tag
    the commit they ran, not "-dirty"; an edited tracked file does make it dirty."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "compare").mkdir()
    for name in ("dvc.lock", "compare/dvc.lock", "code.py"):
        (tmp_path / name).write_text("a\n")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "init"]):
        subprocess.run([*git, *args], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert git_commit() == head
    for name in ("dvc.lock", "compare/dvc.lock"):
        (tmp_path / name).write_text("b\n")
    assert git_commit() == head
    (tmp_path / "code.py").write_text("b\n")
    assert git_commit() == f"{head}-dirty"


TERMINATED_STAGE = """
import sys, time
from pathlib import Path
from drkd import cli
from drkd.config import TrackingConfig
from drkd.tracking import stage_run
def main(argv):
    with stage_run(TrackingConfig(), "train_teacher", {}):
        Path(argv[0]).write_text("running")
        time.sleep(120)
    return 0
sys.exit(cli.run(main, sys.argv[1:]))
"""


def test_a_terminated_stage_ends_its_run_failed(tmp_path: Path) -> None:
    """SIGTERM (a queue or scheduler stopping a stage) unwinds the stage: exit code 143 and its
    MLflow run FAILED, not left RUNNING."""
    import signal
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ready = tmp_path / "ready"
    stage = subprocess.Popen([sys.executable, "-c", TERMINATED_STAGE, str(ready)], cwd=tmp_path,
                             env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline and stage.poll() is None:
        time.sleep(0.2)
    assert ready.exists(), "the stage never started its run"
    stage.send_signal(signal.SIGTERM)
    assert stage.wait(timeout=60) == 143
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["drkd"], output_format="list")
    assert run.info.run_name == "train_teacher" and run.info.status == "FAILED"
