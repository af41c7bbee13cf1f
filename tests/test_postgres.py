"""Tuning workers on a real PostgreSQL server (many machines share one study this way): a
throwaway server of this test's own, on a unix socket in a temporary folder, stopped at the end.
Skipped, saying why, where the server binaries are missing (.ci/run installs them)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import TUNE_PARAMS, toy_teacher, tune_args

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def server_binaries() -> Path | None:
    """The folder of initdb and pg_ctl: on the PATH, else Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(folders[-1]) if folders else None


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A running server; yields the socket folder. As root, the server runs as the `postgres`
    user (PostgreSQL refuses root)."""
    bins = server_binaries()
    if bins is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: "
                    "apt-get install postgresql")
    root = Path(tempfile.mkdtemp(prefix="drkd-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*cmd: str) -> None:
        subprocess.run([*as_user, *cmd], check=True, capture_output=True)

    run(str(bins / "initdb"), "-D", str(root / "data"), "-U", "drkd", "--auth=trust")
    run(str(bins / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-o",
        f"-k {root} -c listen_addresses=''", "start")
    try:
        for db in ("optuna", "mlflow"):
            run(str(bins / "createdb"), "-h", str(root), "-U", "drkd", db)
        yield str(root)
    finally:
        run(str(bins / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def url(socket_dir: str, db: str) -> str:
    return f"postgresql+psycopg2://drkd@/{db}?host={socket_dir}"


def running_trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name="toy", storage=storage).get_trials()
    except KeyError:  # no study yet
        return []


def test_workers_share_a_postgres_study_and_survive_a_killed_one(
    postgres: str, tiny_data: Path, tmp_path: Path
) -> None:
    """A worker killed mid-trial, then `--workers 2`: the killed one's trial failed by its
    missing heartbeat and run again with its values, exactly n_trials trials that ran their
    course, and an MLflow run (in PostgreSQL too) for each of them."""
    storage, tracking = url(postgres, "optuna"), url(postgres, "mlflow")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        **TUNE_PARAMS, "tune": {**TUNE_PARAMS["tune"], "n_trials": 5, "grace_s": 6, "epochs": 1},
        "tracking": {"enabled": True, "uri": tracking, "system_metrics": False}}))
    teacher = toy_teacher(tiny_data, tmp_path / "teacher.pt")
    argv = [*tune_args(params, tiny_data, teacher, tmp_path), "--storage", storage]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # params' store
    env["OMP_NUM_THREADS"] = "1"
    doomed = subprocess.Popen([sys.executable, "-m", "stages.tune", *argv], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill it while its first trial runs (its objective started: the heartbeat runs)
        deadline = time.monotonic() + 120
        while not any(t.state == TrialState.RUNNING and "worker" in t.user_attrs
                      for t in running_trials(storage)):
            assert time.monotonic() < deadline, "the first worker never started a trial"
            time.sleep(0.2)
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
    time.sleep(6.5)  # past the grace period
    done = subprocess.run([sys.executable, "-m", "stages.tune", *argv, "--workers", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    trials = optuna.load_study(study_name="toy", storage=storage).get_trials()
    states = [t.state for t in trials]
    assert states == [TrialState.FAIL] + [TrialState.COMPLETE] * 5
    assert "fail_reason" not in trials[0].user_attrs  # failed for its heartbeat alone
    assert trials[1].user_attrs == {**trials[1].user_attrs, "retry_of": 0, "from": "params.yaml"}
    assert trials[0].system_attrs["fixed_params"].items() <= trials[1].params.items()
    assert len({t.user_attrs["worker"] for t in trials[1:]}) == 2  # both workers ran trials
    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(experiment_names=["drkd"], output_format="list")
    finished = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
                and r.info.status == "FINISHED"]
    assert len(finished) == 5
