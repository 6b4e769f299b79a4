"""cifake: train, track, export and serve a detector of AI-generated images (CIFAKE layout).

The library holds all logic, split by concern: `config`, `data`, `demo`, `preprocessing`, `models`,
`engine`, `metrics`, `calibration`, `robustness`, `explain`, `onnx_export`, `pyfunc_model`, `tracking` (the
only module that talks to MLflow), `pipeline` (the stages, top to bottom) and `cli` (the `cifake` command).

Usage:
    cifake train --epochs 8
"""

CLASS_NAMES = ("real", "ai")  # label index -> name; `ai` (CIFAKE's FAKE) is the positive class
FOLDER_FOR_CLASS = {"real": "REAL", "ai": "FAKE"}
