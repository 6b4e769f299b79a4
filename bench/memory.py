"""Peak resident memory of the training stage against dataset size: CIFAKE, and CIFAKE repeated K times.

`--copies K` builds, under --workdir, a dataset in the CIFAKE layout that holds every image of --data_dir K
times: copy 0 is a hard link to the original, copies 1..K-1 are the original's bytes with a few trailing
bytes added (decoders stop at the image's end marker, so the pixels are the original's while the content
hash, by which the pipeline deduplicates, differs). The real training stage (`experiments/stage.py train`)
then runs on it in a child process with its own throwaway store and decoded-image cache. Everything that
grows with the data (scan, manifest, decoding every split into memory) happens before the first training
step; once the run has logged `decode_seconds` the child trains for --train_seconds more, is stopped with
SIGTERM (its run must end KILLED, not RUNNING) and its peak resident memory comes back with its exit
status (wait4). Memory that does not grow with the data (model, optimizer, activations) is reached in the
first steps.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python bench/memory.py --data_dir /tmp/cifake --copies 5 \\
        --workdir /tmp/cifake_x5 --output memory_x5.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cifake_core import CLASS_NAMES, FOLDER_FOR_CLASS, tracking  # noqa: E402
from cifake_core.data import SOURCE_SPLITS, find_dataset_root  # noqa: E402

EXPERIMENT = "memory-bench"
BUILT_MARKER = "copies.json"
POLL_SECONDS = 1.0


def build_copies(source: Path, destination: Path, copies: int) -> Path:
    """`destination` holding every image of `source` `copies` times (see the module docstring); reused when a
    finished build of the same source and count is there, rebuilt when one was interrupted."""
    marker = destination / BUILT_MARKER
    wanted = {"source": str(source), "copies": copies}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return destination
    shutil.rmtree(destination, ignore_errors=True)
    for split in SOURCE_SPLITS:
        for label in CLASS_NAMES:
            folder = Path(split) / FOLDER_FOR_CLASS[label]
            (destination / folder).mkdir(parents=True)
            files = sorted(path for path in (source / folder).iterdir() if path.is_file())
            print(f"[bench] {folder}: {len(files):,} files x {copies}", flush=True)
            for path in files:
                try:
                    os.link(path, destination / folder / path.name)
                except OSError:  # another filesystem
                    shutil.copyfile(path, destination / folder / path.name)
                content = path.read_bytes()
                for copy in range(1, copies):
                    target = destination / folder / f"{path.stem}.copy{copy}{path.suffix}"
                    target.write_bytes(content + f"\ncifake bench copy {copy}\n".encode())
    marker.write_text(json.dumps(wanted))
    return destination


def _resident_mb(pid: int) -> float:
    """The process's current resident memory in MB (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def measure(data_dir: Path, train_seconds: float, num_workers: int, folder: Path) -> dict:
    """Run the training stage on `data_dir` in a child working in `folder` until it has trained for
    `train_seconds` after decoding; its memory figures and how its run ended."""
    store = f"sqlite:///{folder}/memory.db"
    environment = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store,
        "CIFAKE_CACHE_DIR": str(folder / "cache"),  # decode afresh: the worst case, nothing memory-mapped
        "PYTHONPATH": str(ROOT),
    }
    os.environ["MLFLOW_TRACKING_URI"] = store
    command = [
        sys.executable, str(ROOT / "experiments" / "stage.py"), "train", "--data_dir", str(data_dir),
        "--epochs", "1", "--num_workers", str(num_workers), "--promote", "never", "--experiment_name", EXPERIMENT,
        "--processes", "1",  # the training in the child itself, whose peak wait4 reports
    ]  # fmt: skip
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=folder, env=environment, stdout=subprocess.DEVNULL)
    decoded_at, resident_after_decode, run = None, 0.0, None
    while child.poll() is None:
        time.sleep(POLL_SECONDS)
        if decoded_at is None:
            runs = tracking.experiment_runs(EXPERIMENT) or []
            if runs and "decode_seconds" in runs[0]["metrics"]:
                decoded_at, resident_after_decode, run = time.perf_counter(), _resident_mb(child.pid), runs[0]
                print(f"[bench] decoded in {time.perf_counter() - started:.0f} s; training ...", flush=True)
        elif time.perf_counter() - decoded_at >= train_seconds:
            child.send_signal(signal.SIGTERM)
            break
    # wait4, not wait: the child's own peak resident memory comes with its exit status.
    _, status, usage = os.wait4(child.pid, 0)
    if run is None:
        raise SystemExit(f"[bench] the training stage ended (exit {os.waitstatus_to_exitcode(status)}) before it "
                         "finished decoding; its log is above")  # fmt: skip
    summary = tracking.run_json_artifact(run["run_id"], "data/dataset_summary.json")
    ended = next(record for record in tracking.experiment_runs(EXPERIMENT) if record["run_id"] == run["run_id"])
    return {
        "data_dir": str(data_dir),
        "images": {split: sum(counts.values()) for split, counts in summary["counts"].items()},
        "seconds_to_decoded": decoded_at - started,
        "decode_seconds": run["metrics"]["decode_seconds"],
        "train_seconds": train_seconds,
        "resident_after_decode_mb": resident_after_decode,
        "peak_resident_mb": usage.ru_maxrss / 1024,
        "exit_code": os.waitstatus_to_exitcode(status),
        "run_status": ended["status"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="dataset root in the CIFAKE layout")
    parser.add_argument("--copies", type=int, default=5, help="how many times each image is listed (1 = as is)")
    parser.add_argument("--workdir", default="", help="where the repeated dataset is built (needed for copies > 1)")
    parser.add_argument("--train_seconds", type=float, default=120.0, help="training time after decoding")
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--output", default="", help="write the figures to this JSON file")
    arguments = parser.parse_args()
    if arguments.copies < 1:
        parser.error("--copies must be at least 1")
    if arguments.copies > 1 and not arguments.workdir:
        parser.error("--copies above 1 needs --workdir, a folder for the repeated dataset (about 1 GB per copy)")

    data_dir = find_dataset_root(arguments.data_dir)
    if arguments.copies > 1:
        data_dir = build_copies(data_dir, Path(arguments.workdir), arguments.copies)
    with tempfile.TemporaryDirectory(prefix="cifake-memory-") as folder:
        result = measure(data_dir, arguments.train_seconds, arguments.num_workers, Path(folder))
    result["copies"] = arguments.copies
    images = sum(result["images"].values())
    print(
        f"[bench] {arguments.copies}x: {images:,} images ({result['images']}), decoded in "
        f"{result['decode_seconds']:.0f} s; resident after decoding {result['resident_after_decode_mb']:.0f} MB, "
        f"peak {result['peak_resident_mb']:.0f} MB; run ended {result['run_status']} (exit {result['exit_code']})",
        flush=True,
    )
    if arguments.output:
        Path(arguments.output).write_text(json.dumps({"arguments": vars(arguments), "result": result}, indent=2))


if __name__ == "__main__":
    main()
