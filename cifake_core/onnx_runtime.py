"""Running the exported graph with onnxruntime; no torch here, so serving and the dashboard stay light.

Usage:
    session = onnx_session(Path("model.onnx"))
    prob_ai = session.run([OUTPUT_NAME], {INPUT_NAME: uint8_batch})[0]
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime

INPUT_NAME = "image"
OUTPUT_NAME = "prob_ai"


def onnx_session(path: Path) -> onnxruntime.InferenceSession:
    """An onnxruntime session on the CPU with full graph optimisation."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
