"""Export the detector to one self-contained ONNX file and prove it matches PyTorch.

The graph takes `image`, uint8 (batch, 3, size, size) as `preprocessing` makes it, with a dynamic batch
dimension, and returns `prob_ai` (batch,): normalisation, the calibration temperature (`calibration.py`)
and softmax are inside, so any runtime that feeds it preprocessed images (the pyfunc model, REST serving,
`cifake predict`, the dashboard) gets the same calibrated scores as the training run reported.

Usage:
    report = export_onnx(model, image_size=32, path=Path("model.onnx"), check_batch=test_images[:16],
                         temperature=1.3)
    report["onnx_max_abs_diff"]  # largest |onnxruntime - torch| over check_batch
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

from cifake_core.engine import prob_ai
from cifake_core.files import atomic_path
from cifake_core.onnx_runtime import INPUT_NAME, OUTPUT_NAME, onnx_session

# Float32 ops reordered by graph optimisation differ from PyTorch by ~1e-6; more means a wrong graph.
PARITY_TOLERANCE = 1e-4


class OnnxParityError(RuntimeError):
    """The exported graph does not reproduce PyTorch's scores."""


class _ProbabilityModel(torch.nn.Module):
    def __init__(self, classifier: torch.nn.Module, temperature: float):
        super().__init__()
        self.classifier = classifier
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return prob_ai(self.classifier(image) / self.temperature)


def export_onnx(
    model: torch.nn.Module, image_size: int, path: Path, check_batch: np.ndarray, temperature: float = 1.0
) -> dict[str, float]:
    """Write `path` atomically after onnx.checker and an onnxruntime-vs-PyTorch check on `check_batch`; the graph
    divides the logits by `temperature` (1.0: uncalibrated) before the softmax."""
    wrapped = _ProbabilityModel(model, temperature).cpu().eval()
    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)
    with atomic_path(path) as temporary:
        torch.onnx.export(
            wrapped,
            (example,),
            str(temporary),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
        )
        onnx.checker.check_model(str(temporary), full_check=True)
        onnx_scores = onnx_session(temporary).run([OUTPUT_NAME], {INPUT_NAME: check_batch})[0]
        with torch.no_grad():
            torch_scores = wrapped(torch.from_numpy(check_batch)).numpy()
        max_abs_diff = float(np.max(np.abs(onnx_scores - torch_scores)))
        if max_abs_diff > PARITY_TOLERANCE:
            raise OnnxParityError(
                f"onnxruntime and PyTorch disagree by {max_abs_diff:.2e} (> {PARITY_TOLERANCE}) on the check batch"
            )
    return {
        "onnx_max_abs_diff": max_abs_diff,
        "onnx_check_images": float(len(check_batch)),
        "onnx_file_mb": path.stat().st_size / 2**20,
    }
