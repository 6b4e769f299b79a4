"""A team's shared tracking server: `cifake server` on a real PostgreSQL, trained against, promoted through,
raced by two trainings, and surviving a training killed outright.

PostgreSQL comes from Debian's `postgresql` package (.ci/run installs it); without it these tests skip.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from cifake_core import tracking
from cifake_core.errors import ConfigError
from cifake_core.network import free_port
from cifake_core.tracking_server import check_backend_store
from tests.servers import child_environment, cifake_server, http_status, postgres_database, using_store

pytestmark = pytest.mark.slow
TRAIN_FLAGS = ["--epochs", "1", "--batch_size", "16", "--num_workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`cifake server` on a private PostgreSQL with served artifacts; yields its URL, used as the tracking URI."""
    artifacts = tmp_path_factory.mktemp("artifacts")
    with postgres_database() as database:
        arguments = ["server", "--backend_store_uri", database, "--artifacts_destination", str(artifacts)]
        with cifake_server(arguments, {}, "/health") as url, using_store(url):
            yield url


def _train(server: str, data_dir: Path, *flags: str) -> subprocess.Popen:
    env = child_environment(MLFLOW_TRACKING_URI=server, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "cifake_core.cli", "train", "--data_dir", str(data_dir), *TRAIN_FLAGS, *flags]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finished(process: subprocess.Popen) -> dict:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return json.loads(output[output.index("{\n") :])


def _runs(experiment: str) -> list[mlflow.entities.Run]:
    return MlflowClient().search_runs([mlflow.get_experiment_by_name(experiment).experiment_id])


def test_a_store_that_is_down_is_one_line_with_the_fix():
    with pytest.raises(ConfigError, match="cannot reach the backend store .*Start the database or fix"):
        check_backend_store(f"postgresql://postgres:secret@127.0.0.1:{free_port()}/mlflow")
    with pytest.raises(ConfigError, match="not a database URI"):
        check_backend_store("http://127.0.0.1:5000")


def test_train_register_promote_and_load_production_through_the_server(server: str, tiny_demo: Path):
    result = _finished(_train(server, tiny_demo, "--experiment_name", "shared"))
    assert result["promoted"] and result["version"] == "1"
    (run,) = _runs("shared")
    assert run.info.status == "FINISHED" and {"train_loss", "val_auc", "test_auc"} <= set(run.data.metrics)
    # Artifacts went through the server (served artifacts), not to a path the client chose.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")

    model = mlflow.pyfunc.load_model("models:/cifake-detector@production")
    image = next((tiny_demo / "test" / "FAKE").iterdir()).read_bytes()
    output = model.predict(pd.DataFrame({"image": [base64.b64encode(image).decode()]}))
    assert output["label"][0] in ("ai", "real") and output["model_version"][0] == "cifake-detector/1"


def test_two_trainings_at_once_both_finish_and_production_ends_on_the_better(server: str, tiny_demo: Path):
    name, experiment = "raced-detector", "raced"
    flags = ["--experiment_name", experiment, "--registered_model_name", name, "--epochs", "2"]
    # Two learning rates: two models of different quality on the same data (the same dataset fingerprint).
    processes = [_train(server, tiny_demo, *flags, "--lr", lr) for lr in ("0.002", "0.0005")]
    results = [_finished(process) for process in processes]

    runs = _runs(experiment)
    assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
    for run in runs:  # no metric lost: both epochs of the val history, and the test figures
        assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_auc")] == [1, 2]
        assert {"test_auc", "test_f1", "temperature"} <= set(run.data.metrics)
    found = MlflowClient().search_model_versions(f"name='{name}'")
    versions = {str(version.version): float(version.tags["val_auc"]) for version in found}
    assert sorted(versions) == ["1", "2"] and {result["version"] for result in results} == {"1", "2"}
    production = str(MlflowClient().get_model_version_by_alias(name, "production").version)
    assert versions[production] == max(versions.values())
    assert MlflowClient().search_registered_models(f"name = '{name}{tracking.PROMOTION_LOCK_SUFFIX}'") == []


def test_the_promotion_lock_admits_one_holder_at_a_time(server: str):
    name, holders, overlaps = "locked-detector", [], []
    guard = threading.Lock()

    def promote_once():
        with tracking.promotion_lock(name):
            with guard:
                holders.append(1)
                overlaps.append(len(holders))
            time.sleep(0.2)
            with guard:
                holders.pop()

    threads = [threading.Thread(target=promote_once) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(overlaps) == 4 and max(overlaps) == 1


def test_a_lock_left_by_a_dead_holder_is_broken(server: str, monkeypatch: pytest.MonkeyPatch):
    name = "orphan-detector"
    MlflowClient().create_registered_model(
        name + tracking.PROMOTION_LOCK_SUFFIX, tags={"holder": "gone:1", "acquired": str(time.time() - 3600)}
    )
    with tracking.promotion_lock(name):
        pass
    assert MlflowClient().search_registered_models(f"name = '{name}{tracking.PROMOTION_LOCK_SUFFIX}'") == []


def test_a_training_killed_outright_leaves_the_server_up_and_its_run_is_ended_later(server: str, tiny_demo: Path):
    experiment = "killed"
    # One process: a process group's launcher killed outright still stops its training cleanly (test_pipeline).
    process = _train(server, tiny_demo, "--experiment_name", experiment, "--epochs", "50", "--processes", "1")
    deadline = time.monotonic() + 300
    while not (mlflow.get_experiment_by_name(experiment) and _runs(experiment)):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(1)
    process.send_signal(signal.SIGKILL)  # no handler can run: the run stays RUNNING on the server
    process.communicate(timeout=60)

    assert http_status(f"{server}/health") == 200
    (run,) = _runs(experiment)
    assert run.info.status == "RUNNING" and tracking.HEARTBEAT_TAG in run.data.tags
    assert tracking.end_abandoned_runs(experiment) == []  # its heartbeat is seconds old: not yet
    assert tracking.end_abandoned_runs(experiment, silent_for_seconds=0) == [run.info.run_id]
    ended = MlflowClient().get_run(run.info.run_id)
    assert ended.info.status == "KILLED" and "no heartbeat since" in ended.data.tags["cifake.error"]
