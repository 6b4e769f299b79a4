"""Everything that talks to MLflow: the tracking store, runs, logging, the model registry and aliases.

No other module calls MLflow, so the run lifecycle has one owner: a run always ends FINISHED, FAILED (on an
exception) or KILLED (Ctrl-C, SIGTERM), never RUNNING, and a model version is registered only after the
model is fully logged. Public MLflow APIs only: aliases, not the deprecated stages.

Usage:
    with tracked_run("cifake", run_name="train") as run_id:
        log_params({"epochs": 8})
        log_metrics({"val_auc": 0.9}, step=1)
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
import warnings
from collections.abc import Iterator
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import cifake_core
from cifake_core.errors import RegistryError
from cifake_core.pyfunc_model import ONNX_ARTIFACT, THRESHOLDS_ARTIFACT, model_signature

PRODUCTION_ALIAS = "production"
MODEL_ARTIFACT_NAME = "model"
_SERVING_PACKAGES = ("mlflow", "onnxruntime", "numpy", "pandas", "pillow")
log = logging.getLogger(__name__)


def project_root() -> Path:
    """The nearest folder at or above the working directory that holds `MLproject`, else the working directory."""
    here = Path.cwd().resolve()
    return next((folder for folder in (here, *here.parents) if (folder / "MLproject").is_file()), here)


def configure_tracking() -> str:
    """Use MLFLOW_TRACKING_URI if set, else a SQLite store `mlflow.db` at the project root; return the URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


@contextlib.contextmanager
def tracked_run(experiment_name: str, run_name: str, tags: dict[str, str] | None = None) -> Iterator[str]:
    """Start (or, under `mlflow run`, resume) a run and always end it with a truthful status."""
    configure_tracking()
    resumed_id = os.environ.get("MLFLOW_RUN_ID")
    if not resumed_id:
        mlflow.set_experiment(experiment_name)
    run = mlflow.start_run(run_id=resumed_id or None, run_name=None if resumed_id else run_name, tags=tags)
    experiment = mlflow.get_experiment(run.info.experiment_id)
    if experiment.name != experiment_name:
        log.warning(
            "this run is in experiment %r, not %r: `mlflow run` chose it; pass --experiment-name %s",
            experiment.name,
            experiment_name,
            experiment_name,
        )
    try:
        yield run.info.run_id
    except KeyboardInterrupt:
        mlflow.set_tag("cifake.error", "interrupted (Ctrl-C or SIGTERM)")
        mlflow.end_run("KILLED")
        raise
    except BaseException as error:
        mlflow.set_tag("cifake.error", "".join(traceback.format_exception_only(error)).strip()[:5000])
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_params(params: dict[str, Any]) -> None:
    """Log params the run does not have yet: `mlflow run` logs its entry-point parameters itself, as typed."""
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({key: value for key, value in params.items() if key not in existing})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics(metrics, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    mlflow.set_tags({key: str(value) for key, value in tags.items()})


def log_artifact(path: Path, folder: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=folder)


def log_dataset(manifest: pd.DataFrame, source: str, name: str, fingerprint: str, context: str) -> None:
    """The manifest as an MLflow dataset input, with our content fingerprint as its digest."""
    with warnings.catch_warnings():
        # MLflow registers its local-folder source twice and warns that a path is ambiguous between them.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        dataset = mlflow.data.from_pandas(manifest, source=source, name=name, digest=fingerprint)
    mlflow.log_input(dataset, context=context)


def _serving_requirements() -> list[str]:
    return [f"{package}=={installed_version(package)}" for package in _SERVING_PACKAGES]


def log_pyfunc_model(onnx_path: Path, thresholds_path: Path, input_example: pd.DataFrame) -> str:
    """Log the ONNX pyfunc model (with its own copy of cifake_core) to the active run; return its model URI."""
    info = mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT_NAME,
        python_model=str(Path(cifake_core.__file__).parent / "pyfunc_entry.py"),
        artifacts={ONNX_ARTIFACT: str(onnx_path), THRESHOLDS_ARTIFACT: str(thresholds_path)},
        signature=model_signature(),
        input_example=input_example,
        code_paths=[str(Path(cifake_core.__file__).parent)],
        pip_requirements=_serving_requirements(),
    )
    return info.model_uri


def register_model(model_uri: str, name: str, tags: dict[str, Any]) -> str:
    """A new version of registered model `name` from `model_uri`, tagged; returns the version number."""
    version = mlflow.register_model(model_uri, name, tags={key: str(value) for key, value in tags.items()})
    return str(version.version)


def delete_model_version(name: str, version: str) -> None:
    MlflowClient().delete_model_version(name, version)


def version_info(name: str, version: str) -> dict[str, Any]:
    """A registered version's number, run and tags; RegistryError if it does not exist."""
    try:
        found = MlflowClient().get_model_version(name, version)
    except MlflowException as error:
        raise RegistryError(f"registered model {name!r} has no version {version!r}: {error.message}") from error
    return {
        "version": str(found.version),
        "run_id": found.run_id,
        "tags": dict(found.tags),
        "aliases": list(found.aliases),
    }


def alias_version(name: str, alias: str = PRODUCTION_ALIAS) -> dict[str, Any] | None:
    """The version that `alias` points to, or None when the model or the alias does not exist yet."""
    try:
        found = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return version_info(name, str(found.version))


def set_alias(name: str, version: str, alias: str = PRODUCTION_ALIAS) -> None:
    version_info(name, version)
    MlflowClient().set_registered_model_alias(name, alias, version)


def set_version_tags(name: str, version: str, tags: dict[str, Any]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def load_pyfunc(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    configure_tracking()
    return mlflow.pyfunc.load_model(model_uri)


def download_artifact(run_id: str, path: str, destination: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(destination)))
