"""Inference: PyTorch eager against onnxruntime at batch 1, 64 and 256, onnxruntime's graph optimisation
levels, INT8 quantisation with its AUC change, and how predicting a folder splits between decoding and the model.

One trained model (its checkpoint, from a model URI) and one dataset in the CIFAKE layout. The test split
of the model's own config (same seed, caps and deduplication) is decoded once with the shared preprocessing,
timed: that is the decode side of predicting a folder of ~20,000 files. The model side is onnxruntime over
the decoded arrays. `--flip_tta` measures the model with its mirror-image averaging forced on or off (it runs
inside the graph, so it doubles the pixels each prediction scores). INT8 is onnxruntime's static QDQ
quantisation (per-channel weights), calibrated on validation images, and judged on the whole test split
against the FP32 graph.

Usage:
    MLFLOW_TRACKING_URI=sqlite:///mlflow.db .venv/bin/python bench/inference.py \\
        --model_uri models:/cifake-detector@production --data_dir /tmp/cifake --threads 1 --output inference.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cifake_core import tracking  # noqa: E402
from cifake_core.data import find_dataset_root, load_split_arrays, prepare_splits  # noqa: E402
from cifake_core.engine import prob_ai  # noqa: E402
from cifake_core.metrics import binary_metrics  # noqa: E402
from cifake_core.models import load_checkpoint  # noqa: E402
from cifake_core.onnx_export import export_onnx  # noqa: E402
from cifake_core.onnx_runtime import INPUT_NAME, OUTPUT_NAME  # noqa: E402

BATCH_SIZES = (1, 64, 256)
OPTIMISATION_LEVELS = {
    "disabled": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CALIBRATION_IMAGES = 512


def _session(path: Path, threads: int, level: str = "all") -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = OPTIMISATION_LEVELS[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def images_per_second(score: Callable[[np.ndarray], object], batch: np.ndarray, seconds: float) -> float:
    """Median throughput of `score(batch)` over repeated calls lasting about `seconds`, after one warm-up call."""
    score(batch)
    timings: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(timings) < 3:
        started = time.perf_counter()
        score(batch)
        timings.append(time.perf_counter() - started)
    return len(batch) / statistics.median(timings)


def score_all(session: onnxruntime.InferenceSession, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    chunks = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[start : start + batch_size]})[0]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks)


class _Calibration(CalibrationDataReader):
    def __init__(self, images: np.ndarray):
        self._batches = iter(images[start : start + 32] for start in range(0, len(images), 32))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_uri", required=True, help="models:/NAME/VERSION, models:/NAME@ALIAS or runs:/ID/model")
    parser.add_argument("--data_dir", required=True, help="dataset root in the CIFAKE layout")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", type=float, default=3.0, help="time per throughput measurement")
    parser.add_argument(
        "--flip_tta",
        choices=("checkpoint", "true", "false"),
        default="checkpoint",
        help="score each image with its mirror image: as the model was trained (checkpoint), or force it on or off",
    )
    parser.add_argument("--output", default="", help="write the figures to this JSON file")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    tracking.configure_tracking()

    with tempfile.TemporaryDirectory(prefix="cifake-inference-") as folder:
        work = Path(folder)
        model, meta = load_checkpoint(tracking.download_checkpoint(arguments.model_uri, work))
        config = meta["config"]
        if arguments.flip_tta != "checkpoint":
            model.flip_tta = arguments.flip_tta == "true"
        image_size = int(config["image_size"])
        print(
            f"[bench] {arguments.model_uri}: epoch {meta['epoch']}, {image_size} px, flip_tta {model.flip_tta}",
            flush=True,
        )
        prepared = prepare_splits(
            find_dataset_root(arguments.data_dir),
            float(config["val_fraction"]),
            int(config["max_train_per_class"]),
            int(config["max_test_per_class"]),
            int(config["seed"]),
            num_workers=arguments.threads,
        )
        started = time.perf_counter()
        test_images, test_labels = load_split_arrays(prepared, "test", image_size, num_workers=0)
        decode_seconds = time.perf_counter() - started
        print(f"[bench] decoded {len(test_images):,} test files in {decode_seconds:.1f} s (one process)", flush=True)
        calibration, _ = load_split_arrays(prepared, "val", image_size, num_workers=0)
        calibration = calibration[np.random.default_rng(0).permutation(len(calibration))[:CALIBRATION_IMAGES]]

        fp32_path, prepared_path, int8_path = work / "model.onnx", work / "model.pre.onnx", work / "model.int8.onnx"
        export_onnx(model, image_size, fp32_path, check_batch=test_images[:16])
        quant_pre_process(fp32_path, prepared_path)  # folds BatchNorm and infers shapes, as onnxruntime advises
        quantize_static(
            str(prepared_path),
            str(int8_path),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )

        sessions = {
            f"onnxruntime_{level}": _session(fp32_path, arguments.threads, level) for level in OPTIMISATION_LEVELS
        }
        sessions["onnxruntime_int8"] = _session(int8_path, arguments.threads)
        speeds = measure_speeds(model, sessions, test_images, arguments.seconds)

        started = time.perf_counter()
        fp32_scores = score_all(sessions["onnxruntime_all"], test_images)
        model_seconds = time.perf_counter() - started
        int8_scores = score_all(sessions["onnxruntime_int8"], test_images)
        fp32_auc = binary_metrics(test_labels, fp32_scores, 0.5, "fp32")["fp32_auc"]
        int8_auc = binary_metrics(test_labels, int8_scores, 0.5, "int8")["int8_auc"]
        sizes = {path.name: path.stat().st_size / 2**20 for path in (fp32_path, int8_path)}

    results = {
        "images_per_second": speeds,
        "folder": {"files": len(test_images), "decode_seconds": decode_seconds, "model_seconds": model_seconds},
        "int8": {
            "fp32_auc": fp32_auc,
            "int8_auc": int8_auc,
            "max_abs_score_change": float(np.max(np.abs(int8_scores - fp32_scores))),
            "file_mb": sizes,
        },
    }
    _print_tables(results)
    if arguments.output:
        Path(arguments.output).write_text(json.dumps({"arguments": vars(arguments), **results}, indent=2))


def measure_speeds(
    model: torch.nn.Module, sessions: dict[str, onnxruntime.InferenceSession], images: np.ndarray, seconds: float
) -> dict[str, dict[int, float]]:
    """Images/s of PyTorch eager and of each session at each batch size."""
    scorers = {"torch_eager": _torch_scorer(model)} | {name: _onnx_scorer(item) for name, item in sessions.items()}
    speeds: dict[str, dict[int, float]] = {}
    for name, score in scorers.items():
        speeds[name] = {size: images_per_second(score, images[:size], seconds) for size in BATCH_SIZES}
        print(f"[bench] {name}: " + ", ".join(f"batch {s} {v:.0f} img/s" for s, v in speeds[name].items()), flush=True)
    return speeds


def _torch_scorer(model: torch.nn.Module) -> Callable[[np.ndarray], object]:
    def score(batch: np.ndarray) -> object:
        with torch.no_grad():
            return prob_ai(model(torch.from_numpy(batch)))

    return score


def _onnx_scorer(session: onnxruntime.InferenceSession) -> Callable[[np.ndarray], object]:
    return lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: batch})


def _print_tables(results: dict) -> None:
    speeds = results["images_per_second"]
    baseline = speeds["torch_eager"]
    print("\n| engine | " + " | ".join(f"batch {size} img/s (vs torch)" for size in BATCH_SIZES) + " |")
    print("|---|" + "---|" * len(BATCH_SIZES))
    for name, by_size in speeds.items():
        cells = " | ".join(f"{by_size[size]:.0f} ({by_size[size] / baseline[size]:.2f}x)" for size in BATCH_SIZES)
        print(f"| {name} | {cells} |")
    folder, int8 = results["folder"], results["int8"]
    print(
        f"\nfolder of {folder['files']:,} files: decoding {folder['decode_seconds']:.1f} s, "
        f"model {folder['model_seconds']:.1f} s ({folder['decode_seconds'] / folder['model_seconds']:.1f}x)"
    )
    print(
        f"INT8: test AUC {int8['fp32_auc']:.4f} -> {int8['int8_auc']:.4f} "
        f"({int8['int8_auc'] - int8['fp32_auc']:+.4f}), max score change {int8['max_abs_score_change']:.3f}, "
        f"file {int8['file_mb']['model.onnx']:.1f} -> {int8['file_mb']['model.int8.onnx']:.1f} MB"
    )


if __name__ == "__main__":
    main()
