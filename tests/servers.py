"""Test helpers for tracking stores and for the servers that `cifake serve` and `cifake dashboard` start.

Usage:
    with using_store(uri):
        pipeline.train(config)
    with cifake_server(["serve"], {"MLFLOW_TRACKING_URI": uri}, "/ping") as base_url:
        assert http_status(f"{base_url}/ping") == 200
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

START_TIMEOUT_S = 180


@contextlib.contextmanager
def using_store(uri: str) -> Iterator[str]:
    """MLflow pointed at `uri` (environment and client), outside any `mlflow run`, for a module-scoped fixture."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)  # the client keeps a process-wide URI that an earlier test may have set
        yield uri


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    and stops the whole group afterwards."""
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_RUN")}
    environment |= {"PATH": os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")]), **env}
    process = subprocess.Popen(
        [sys.executable, "-m", "cifake_core.cli", *arguments, "--port", str(port)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while http_status(base_url + health_path) != 200:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, f"{base_url}{health_path} did not answer within {START_TIMEOUT_S} s"
            time.sleep(0.5)
        yield base_url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
