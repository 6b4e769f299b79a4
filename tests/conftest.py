"""Shared fixtures: tiny datasets in the CIFAKE layout made on the spot, and a private MLflow store per test.

Nothing here reads the real CIFAKE archive: every image is generated.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from cifake_core.demo import ensure_demo_dataset

TINY_TRAIN_PER_CLASS = 24
TINY_TEST_PER_CLASS = 8


def image_bytes(seed: int, size: int = 32, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A distinct random image, encoded; the seed decides the pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Build a dataset in the CIFAKE layout: `make_dataset(train=6, test=3)` -> root with distinct JPEGs."""

    def build(train: int = 6, test: int = 3, name: str = "dataset") -> Path:
        root = tmp_path / name
        seed = 0
        for split, count in (("train", train), ("test", test)):
            for folder in ("FAKE", "REAL"):
                (root / split / folder).mkdir(parents=True)
                for index in range(count):
                    seed += 1
                    (root / split / folder / f"{index} ({seed}).jpg").write_bytes(image_bytes(seed))
        return root

    return build


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small copy of the embedded demo dataset, learnable enough for an end-to-end run."""
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "tiny", TINY_TRAIN_PER_CLASS, TINY_TEST_PER_CLASS)


@pytest.fixture
def tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store for one test, outside any `mlflow run` context."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)  # the client keeps a process-wide URI that an earlier test may have set
    return uri


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where CUDA is present; elsewhere they are skipped with that reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
