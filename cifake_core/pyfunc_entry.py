"""The model-from-code file MLflow logs beside `model.onnx`: loading the model runs it, so nothing is pickled.

Usage (by tracking.log_pyfunc_model, not by hand):
    mlflow.pyfunc.log_model(name="model", python_model="cifake_core/pyfunc_entry.py", ...)
"""

import mlflow

from cifake_core.pyfunc_model import CifakeOnnxModel

mlflow.models.set_model(CifakeOnnxModel())
