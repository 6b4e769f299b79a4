"""Serving benchmark: in-process inference against the REST endpoint of `cifake serve`, in one run.

Measures, on the model behind `--model_uri` (default: production in MLFLOW_TRACKING_URI):
  1. in-process latency for one image: the ONNX session alone, and the pyfunc `predict` (base64 decode,
     shared preprocessing, onnxruntime) that the server runs;
  2. REST latency (p50, p99) for one image and for a batch of 64, through `cifake serve` on 127.0.0.1;
  3. throughput in images/s with 4 concurrent clients posting batches of 64.
Prints a progress line per step and a Markdown table; `--output FILE.json` keeps the figures.

Usage:
    MLFLOW_TRACKING_URI=sqlite:///mlflow.db .venv/bin/python bench/serving.py --output docs/serving.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import requests
from PIL import Image

from cifake_core import tracking
from cifake_core.network import free_port
from cifake_core.preprocessing import preprocess_image

BATCH = 64
CLIENTS = 4


def _jpeg_images(count: int, side: int = 32) -> list[str]:
    """CIFAKE-like inputs: distinct 32x32 JPEGs at quality 75, base64-encoded."""
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=75)
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    return encoded


def _timings_ms(call: Callable[[], object], repeats: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        call()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def _summary(timings: list[float]) -> dict[str, float]:
    return {
        "p50_ms": float(np.percentile(timings, 50)),
        "p99_ms": float(np.percentile(timings, 99)),
        "mean_ms": statistics.fmean(timings),
    }


@contextmanager
def _server(model_uri: str, workers: int):
    """`cifake serve` in its own process group on a free port; yields the base URL, stops it afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "cifake_core.cli", "serve", "--model_uri", model_uri, "--port", str(port)]
    command += ["--workers", str(workers)]
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"{base_url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"`{' '.join(command)}` did not start (exit {process.poll()})")
            time.sleep(0.5)
        yield base_url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def _post(session: requests.Session, url: str, images: list[str]) -> None:
    response = session.post(url, json={"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}})
    response.raise_for_status()


def _throughput(url: str, images: list[str], seconds: float) -> float:
    """Images/s with CLIENTS threads, each with its own keep-alive connection, posting batches for `seconds`."""
    done = [0] * CLIENTS
    stop = threading.Event()

    def client(index: int) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                _post(session, url, images)
                done[index] += len(images)

    started = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client, index) for index in range(CLIENTS)]
        time.sleep(seconds)
        stop.set()
        for future in futures:
            future.result()
    return sum(done) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_uri", default="models:/cifake-detector@production")
    parser.add_argument("--repeats", type=int, default=200, help="requests per latency figure")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of the throughput test")
    parser.add_argument("--workers", type=int, default=1, help="server worker processes")
    parser.add_argument("--output", type=Path, default=None, help="write the figures as JSON here")
    arguments = parser.parse_args()

    pinned = tracking.pin_model_uri(arguments.model_uri)
    print(f"model {pinned}; {os.cpu_count()} CPU cores; {platform.processor() or platform.machine()}", flush=True)
    pyfunc = tracking.load_pyfunc(pinned)  # with MLflow's input checks, as the server runs it
    scorer = pyfunc.unwrap_python_model()
    single, batch = _jpeg_images(1), _jpeg_images(BATCH)
    array = preprocess_image(base64.b64decode(single[0]), scorer.image_size)[None]
    frame = pd.DataFrame({"image": single})
    figures: dict[str, dict[str, float]] = {}

    print("1/3 in-process latency", flush=True)
    figures["in_process_onnx_1"] = _summary(_timings_ms(lambda: scorer.score_arrays(array), arguments.repeats))
    figures["in_process_pyfunc_1"] = _summary(_timings_ms(lambda: pyfunc.predict(frame), arguments.repeats))
    batch_frame = pd.DataFrame({"image": batch})
    figures["in_process_pyfunc_64"] = _summary(
        _timings_ms(lambda: pyfunc.predict(batch_frame), max(20, arguments.repeats // 4))
    )

    print(f"2/3 REST latency (workers={arguments.workers})", flush=True)
    with _server(pinned, arguments.workers) as base_url, requests.Session() as session:
        url = f"{base_url}/invocations"
        figures["rest_1"] = _summary(_timings_ms(lambda: _post(session, url, single), arguments.repeats))
        figures["rest_64"] = _summary(_timings_ms(lambda: _post(session, url, batch), max(20, arguments.repeats // 4)))
        print(f"3/3 throughput, {CLIENTS} clients x batches of {BATCH}, {arguments.seconds:.0f} s", flush=True)
        throughput = _throughput(url, batch, arguments.seconds)

    in_process_64 = figures["in_process_pyfunc_64"]["p50_ms"]
    result = {
        "model": pinned,
        "workers": arguments.workers,
        "figures": figures,
        "rest_images_per_second_4_clients": throughput,
        "in_process_images_per_second_64": BATCH / in_process_64 * 1000,
        "rest_overhead_ms_1": figures["rest_1"]["p50_ms"] - figures["in_process_pyfunc_1"]["p50_ms"],
        "rest_overhead_ms_64": figures["rest_64"]["p50_ms"] - in_process_64,
    }
    print("\n| measure | p50 ms | p99 ms |\n|---|---|---|")
    for name, summary in figures.items():
        print(f"| {name} | {summary['p50_ms']:.2f} | {summary['p99_ms']:.2f} |")
    print(
        f"\nREST, {CLIENTS} clients, batches of {BATCH}: {throughput:.0f} images/s "
        f"(in-process, one thread: {result['in_process_images_per_second_64']:.0f} images/s)"
    )
    print(
        f"REST overhead at p50: {result['rest_overhead_ms_1']:.2f} ms for 1 image, "
        f"{result['rest_overhead_ms_64']:.2f} ms for {BATCH}"
    )
    if arguments.output:
        arguments.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
