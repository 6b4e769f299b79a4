"""Test helpers for tracking stores, a throwaway PostgreSQL, and the servers that `cifake` commands start.

Usage:
    with using_store(uri):
        pipeline.train(config)
    with cifake_server(["serve"], {"MLFLOW_TRACKING_URI": uri}, "/ping") as base_url:
        assert http_status(f"{base_url}/ping") == 200
    with postgres_database() as database_uri:  # postgresql://postgres@127.0.0.1:PORT/mlflow
        ...
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from cifake_core.network import free_port

START_TIMEOUT_S = 180


@contextlib.contextmanager
def using_store(uri: str) -> Iterator[str]:
    """MLflow pointed at `uri` (environment and client), outside any `mlflow run`, for a module-scoped fixture."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)  # the client keeps a process-wide URI that an earlier test may have set
        yield uri


def child_environment(**extra: str) -> dict[str, str]:
    """The environment for a `cifake`, `mlflow` or `torchrun` child: outside any `mlflow run` (no MLFLOW_RUN_*),
    with this interpreter's folder first on PATH, as in an activated virtual environment, plus `extra`."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_RUN")}
    path = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    return environment | {"PATH": path, **extra}


def http_status(url: str) -> int:
    """The HTTP status of a GET, or 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError):
        return 0


@contextlib.contextmanager
def cifake_server(arguments: list[str], env: dict[str, str], health_path: str) -> Iterator[str]:
    """`cifake ARGUMENTS --port FREE` in its own process group until `health_path` answers 200; yields the base URL
    and stops the whole group afterwards. Its output goes to a file: a server logging every request would
    block on a full pipe that nobody reads."""
    port = free_port()
    environment = child_environment(**env)
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "cifake_core.cli", *arguments, "--port", str(port)],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while http_status(base_url + health_path) != 200:
                assert process.poll() is None, output.seek(0) or output.read()
                assert time.monotonic() < deadline, f"{base_url}{health_path} silent for {START_TIMEOUT_S} s"
                time.sleep(0.5)
            yield base_url
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def postgres_binaries() -> Path | None:
    """The folder of PostgreSQL's server programs (Debian keeps them off PATH), or None when not installed."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def postgres_database(database: str = "mlflow") -> Iterator[str]:
    """A private PostgreSQL cluster in a temporary folder on a free loopback port, with one empty database;
    yields its URI and removes the cluster afterwards. As root, the cluster runs as the `postgres` user,
    since PostgreSQL refuses to run as root."""
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql); .ci/run installs it")
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="cifake-postgres-"))
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    pg_ctl = [*as_postgres, str(binaries / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(
            [*as_postgres, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*pg_ctl, "-o", options, "-l", str(folder / "server.log"), "-w", "start"], check=True, capture_output=True
        )
        subprocess.run(
            [
                str(binaries / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "-c",
                f"CREATE DATABASE {database}",
            ],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
