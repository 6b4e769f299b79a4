"""The served model: an MLflow pyfunc around `model.onnx` and `thresholds.json`, needing no torch.

Input: a DataFrame with a column `image` holding base64-encoded image bytes (any size or format Pillow
reads; a `data:image/...;base64,` prefix is accepted). Output, one row per image: `prob_ai`, `label`
(`ai`/`real`), the `threshold` applied, `error` (empty when the image was classified, otherwise what was
wrong with it, with `label` = `error`) and `model_version`, the registered version answering
(`cifake-detector/3`; `run:<id>` when unregistered). One bad image never loses the others. The inference
parameter `threshold` picks a named threshold from `thresholds.json` (`f1`, `fpr_1pct`, ...) or a number
in [0, 1]; by default the model applies the one `thresholds.json` names as default.

Usage:
    model = mlflow.pyfunc.load_model("models:/cifake-detector@production")
    model.predict(pd.DataFrame({"image": [base64.b64encode(png_bytes).decode()]}), params={"threshold": "f1"})
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from cifake_core import CLASS_NAMES
from cifake_core.errors import ImageError, ThresholdError
from cifake_core.onnx_runtime import INPUT_NAME, OUTPUT_NAME, onnx_session
from cifake_core.preprocessing import ImageSource, preprocess_image

INPUT_COLUMN = "image"
ONNX_ARTIFACT = "onnx_model"
THRESHOLDS_ARTIFACT = "thresholds"
DEFAULT_THRESHOLD = "default"
ERROR_LABEL = "error"
_BATCH = 256


def model_signature() -> ModelSignature:
    """The pyfunc contract that serving, batch prediction and the dashboard build on."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", INPUT_COLUMN)]),
        outputs=Schema(
            [
                ColSpec("double", "prob_ai"),
                ColSpec("string", "label"),
                ColSpec("double", "threshold"),
                ColSpec("string", "error"),
                ColSpec("string", "model_version"),
            ]
        ),
        params=ParamSchema([ParamSpec("threshold", "string", DEFAULT_THRESHOLD)]),
    )


def decode_base64_image(value: object) -> bytes:
    """The raw bytes of one base64 value, or ImageError saying why there are none."""
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value)
    elif isinstance(value, str):
        text = value.split(",", 1)[1].encode() if value.startswith("data:") else value.encode()
    else:
        raise ImageError(f"expected a base64 string, got {type(value).__name__}")
    if not text.strip():
        raise ImageError("empty value: expected base64-encoded image bytes")
    try:
        return base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError(f"invalid base64: {error}") from error


class CifakeOnnxModel(PythonModel):
    """Scores images with onnxruntime and applies a decision threshold from thresholds.json."""

    def load_context(self, context) -> None:
        from cifake_core.tracking import registered_version_of

        self._session = onnx_session(Path(context.artifacts[ONNX_ARTIFACT]))
        self.image_size = int(self._session.get_inputs()[0].shape[-1])
        report = json.loads(Path(context.artifacts[THRESHOLDS_ARTIFACT]).read_text())
        self.thresholds = {name: entry["value"] for name, entry in report["thresholds"].items()}
        self.default_threshold = report["default"]
        run_id = (context.model_config or {}).get("run_id", "")
        # Resolved once at load: a served model answers with the registered version it is.
        self.model_version = registered_version_of(run_id) or f"run:{run_id}"

    def resolve_threshold(self, requested: object) -> float:
        """A threshold name from thresholds.json, `default`, or a number in [0, 1], as a float."""
        name = str(requested if requested is not None else DEFAULT_THRESHOLD).strip()
        if name == DEFAULT_THRESHOLD:
            name = self.default_threshold
        if name in self.thresholds:
            return float(self.thresholds[name])
        try:
            value = float(name)
        except ValueError:
            value = math.nan
        if not 0.0 <= value <= 1.0:
            raise ThresholdError(
                f"threshold must be one of {', '.join([DEFAULT_THRESHOLD, *self.thresholds])} or a number in [0, 1], "
                f"got {requested!r}"
            )
        return value

    def score_arrays(self, images: np.ndarray) -> np.ndarray:
        """prob_ai for a uint8 (N, 3, S, S) batch from `preprocessing`, in batches."""
        scores = [
            self._session.run([OUTPUT_NAME], {INPUT_NAME: images[start : start + _BATCH]})[0]
            for start in range(0, len(images), _BATCH)
        ]
        return np.concatenate(scores) if scores else np.empty(0, dtype=np.float32)

    def classify(self, sources: Sequence[ImageSource | ImageError], threshold: float) -> pd.DataFrame:
        """One row per source (bytes, path or PIL image); an ImageError in place of a source is that row's error."""
        errors = [str(source) if isinstance(source, ImageError) else "" for source in sources]
        arrays: list[np.ndarray] = []
        good_rows: list[int] = []
        for row, source in enumerate(sources):
            if errors[row]:
                continue
            try:
                arrays.append(preprocess_image(source, self.image_size))
                good_rows.append(row)
            except ImageError as error:
                errors[row] = str(error)
        prob = np.full(len(sources), np.nan)
        if arrays:
            prob[good_rows] = self.score_arrays(np.stack(arrays))
        labels = np.where(prob >= threshold, CLASS_NAMES[1], CLASS_NAMES[0]).astype(object)
        labels[[bool(message) for message in errors]] = ERROR_LABEL
        return pd.DataFrame(
            {
                "prob_ai": prob,
                "label": labels,
                "threshold": threshold,
                "error": errors,
                "model_version": self.model_version,
            }
        )

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        try:
            threshold = self.resolve_threshold((params or {}).get("threshold"))
        except ThresholdError as error:
            # An MlflowException keeps this message in the REST answer (400) instead of a generic one.
            raise MlflowException.invalid_parameter_value(str(error)) from error
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            columns = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise MlflowException.invalid_parameter_value(
                f"input needs a column {INPUT_COLUMN!r} of base64-encoded image bytes, got {columns}"
            )
        return self.classify([_decoded_or_error(value) for value in model_input[INPUT_COLUMN].tolist()], threshold)


def _decoded_or_error(value: object) -> bytes | ImageError:
    try:
        return decode_base64_image(value)
    except ImageError as error:
        return error
