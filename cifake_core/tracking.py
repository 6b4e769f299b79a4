"""Everything that talks to MLflow: the tracking store, runs, logging, the model registry and aliases.

No other module calls MLflow, so the run lifecycle has one owner: a run always ends FINISHED, FAILED (on an
exception) or KILLED (Ctrl-C, SIGTERM), never RUNNING, and a model version is registered only after the
model is fully logged. A process killed outright (SIGKILL, a lost machine) cannot end its run: the launcher of
`cifake train`'s processes ends it (`end_run_left_running`), and for any other a live run beats a heartbeat tag and
the next stage started in the experiment ends runs whose heartbeat stopped. A Ctrl-C or SIGTERM that arrives while
this process writes a run (its start and end, params, metrics, tags, artifacts, the model) or a registered version to
a database store acts once that write is whole.
Under torchrun only rank 0 writes: the other ranks' calls here do nothing. Public MLflow APIs only:
aliases, not the deprecated stages.

Usage:
    with tracked_run("cifake", run_name="train") as run_id:
        log_params({"epochs": 8})
        log_metrics({"val_auc": 0.9}, step=1)
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import signal
import socket
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import cifake_core
from cifake_core.errors import RUN_ID_FILE_VARIABLE, RegistryError
from cifake_core.pyfunc_model import ONNX_ARTIFACT, THRESHOLDS_ARTIFACT, model_signature
from cifake_core.tracking_server import database_scheme

PRODUCTION_ALIAS = "production"
MODEL_ARTIFACT_NAME = "model"
CHECKPOINT_ARTIFACT = "checkpoint/best.pt"
HEARTBEAT_TAG = "cifake.heartbeat"
ERROR_TAG = "cifake.error"
# `mlflow run` logs its parameters as typed (`batch_size=0`, auto); what trained goes beside them under this prefix.
USED_PARAM_TAG_PREFIX = "cifake.used."
HEARTBEAT_SECONDS = 30.0
# Twenty missed heartbeats: a run is not declared dead for a slow network or a long pause of its process.
ABANDONED_AFTER_SECONDS = 600.0
# The registry has no compare-and-set, so promotions serialise on a lock: a registered model of this name
# suffix, whose creation the store makes atomic (its name is the table's primary key).
PROMOTION_LOCK_SUFFIX = ".promotion-lock"
PROMOTION_LOCK_WAIT_SECONDS = 120.0
PROMOTION_LOCK_STALE_SECONDS = 300.0
_NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"}
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


def _is_main_process() -> bool:
    """Rank 0 under torchrun (its RANK variable, read here so this module never imports torch), else True."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back until the block ends, then raised again, where this process writes to a
    database store itself: raised inside one of SQLAlchemy's transactions, an interrupt left it half-committed
    (MLflow then reported it as its own internal error, and the run ended FAILED, not KILLED) or holding SQLite's
    write lock. Python handles signals in the main thread only; a request to a tracking server is safe to abandon."""
    if threading.current_thread() is not threading.main_thread() or not database_scheme(mlflow.get_tracking_uri()):
        yield
        return
    received: list[int] = []
    handlers = {
        number: signal.signal(number, lambda signum, frame: received.append(signum))
        for number in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python
        if received:
            signal.raise_signal(received[0])


def _main_process_write(function: Callable) -> Callable:
    """`function`, an MLflow write, run whole (`_interrupts_held`) and by rank 0 only."""

    @functools.wraps(function)
    def on_rank_zero(*args, **kwargs):
        if not _is_main_process():
            return None
        with _interrupts_held():
            return function(*args, **kwargs)

    return on_rank_zero


class _Heartbeat:
    """A daemon thread that stamps HEARTBEAT_TAG on a run every HEARTBEAT_SECONDS until stopped."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id}", daemon=True)

    def _beat(self) -> None:
        client, warned = MlflowClient(), False
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            try:
                client.set_tag(self.run_id, HEARTBEAT_TAG, _heartbeat_stamp())
            except Exception as error:  # a missed beat must never disturb the run itself
                if not warned:
                    log.warning("cannot write the run's heartbeat (%s); retrying quietly", error)
                    warned = True

    def start(self) -> None:
        MlflowClient().set_tag(self.run_id, HEARTBEAT_TAG, _heartbeat_stamp())
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()


def _heartbeat_stamp() -> str:
    """Now, in whole seconds rounded down: a beat rounded up would lie up to half a second in the future, and a run
    killed at once would not yet count as silent for `end_abandoned_runs(..., silent_for_seconds=0)`."""
    return str(int(time.time()))


def end_abandoned_runs(experiment_name: str, silent_for_seconds: float = ABANDONED_AFTER_SECONDS) -> list[str]:
    """End as KILLED the RUNNING runs of an experiment whose heartbeat stopped `silent_for_seconds` ago (their
    process was killed outright); returns their ids. Runs without a heartbeat tag are left alone."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    now, ended = time.time(), []
    for run in client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'"):
        beat = run.data.tags.get(HEARTBEAT_TAG)
        if beat is None or now - float(beat) < silent_for_seconds:
            continue
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(beat)))
        reason = (
            f"abandoned: no heartbeat since {since}, so its process was killed or lost the tracking server; "
            f"ended by a later stage on {socket.gethostname()}"
        )
        _end_run(client, run.info.run_id, "KILLED", reason)
        ended.append(run.info.run_id)
    if ended:
        log.warning("ended %d abandoned RUNNING run(s) as KILLED: %s", len(ended), ", ".join(ended))
    return ended


def end_run_left_running(run_id_file: Path, status: str, reason: str) -> str | None:
    """End as `status`, with `reason` as its error, the run whose id a process wrote to `run_id_file`
    (`RUN_ID_FILE_VARIABLE`) if that process left it RUNNING, as one killed outright does; returns its id then,
    else None (no id written, the run already ended, or the tracking store unreachable: a warning)."""
    try:
        run_id = run_id_file.read_text().strip()
    except FileNotFoundError:  # the process ended before it started a run
        return None
    configure_tracking()
    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return None
        _end_run(client, run_id, status, reason)
    except (MlflowException, OSError) as error:  # the failure being reported matters more than this
        log.warning(
            "could not end run %s (%s): the next stage in its experiment ends it once its heartbeat is %d minutes old",
            run_id,
            error,
            ABANDONED_AFTER_SECONDS // 60,
        )
        return None
    return run_id


def _end_run(client: MlflowClient, run_id: str, status: str, reason: str) -> None:
    client.set_tag(run_id, ERROR_TAG, reason)
    client.set_terminated(run_id, status=status)


@contextlib.contextmanager
def tracked_run(experiment_name: str, run_name: str, tags: dict[str, str] | None = None) -> Iterator[str]:
    """Start (or, under `mlflow run`, resume) a run, beat its heartbeat, and always end it with a truthful
    status. On torchrun ranks other than 0 it does nothing and yields an empty run id."""
    if not _is_main_process():
        yield ""
        return
    configure_tracking()
    resumed_id = os.environ.get("MLFLOW_RUN_ID")
    # By id, not by the active experiment: when another process creates the experiment a moment earlier,
    # mlflow.set_experiment returns it without making it active, and the run would land in `Default`.
    experiment_id = None if resumed_id else mlflow.set_experiment(experiment_name).experiment_id
    end_abandoned_runs(experiment_name)
    with _interrupts_held():
        run = mlflow.start_run(
            run_id=resumed_id or None,
            experiment_id=experiment_id,
            run_name=None if resumed_id else run_name,
            tags=tags,
        )
    status, error_text = "FINISHED", ""
    heartbeat = _Heartbeat(run.info.run_id)
    try:
        if run_id_file := os.environ.get(RUN_ID_FILE_VARIABLE):
            Path(run_id_file).write_text(run.info.run_id)
        heartbeat.start()
        experiment = mlflow.get_experiment(run.info.experiment_id)
        if experiment.name != experiment_name:
            log.warning(
                "this run is in experiment %r, not %r: `mlflow run` chose it; pass --experiment-name %s",
                experiment.name,
                experiment_name,
                experiment_name,
            )
        yield run.info.run_id
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            status, error_text = "KILLED", "interrupted (Ctrl-C or SIGTERM)"
        else:
            status, error_text = "FAILED", "".join(traceback.format_exception_only(error)).strip()[:5000]
        # An interrupt inside a write that holds none (the first heartbeat, the promotion lock, a caller's own MLflow
        # call) leaves a SQLite statement mid-way, holding the store's write lock while the finished frames keep its
        # cursor alive: freeing their locals releases it before the run is ended.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        heartbeat.stop()
        with _interrupts_held():  # a second Ctrl-C waits for the status to be written
            try:
                if error_text:
                    mlflow.set_tag(ERROR_TAG, error_text)
            finally:  # the status is written even when the tag cannot be
                mlflow.end_run(status)


@_main_process_write
def log_params(params: dict[str, Any]) -> None:
    """Log params the run does not have yet. `mlflow run` logs its entry-point parameters itself, as typed, and
    MLflow never changes a logged param: a value that differs from the typed one (the batch size that `0`
    chose) is tagged `cifake.used.<name>`, so runs started either way compare on what they trained with."""
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({key: value for key, value in params.items() if key not in existing})
    if used := {
        f"{USED_PARAM_TAG_PREFIX}{key}": value
        for key, value in params.items()
        if key in existing and _differs(existing[key], value)
    }:
        set_tags(used)


def _differs(logged: str, value: Any) -> bool:
    """Whether a param logged as typed (`-P lr=8e-3`) names another value than `value`, read as `value`'s type: as
    strings `8e-3` and `0.008` differ, as numbers they are the same learning rate and need no tag."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return type(value)(logged) != value
        except ValueError:
            return True
    return logged != str(value)


@_main_process_write
def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics(metrics, step=step)


@_main_process_write
def set_tags(tags: dict[str, Any]) -> None:
    mlflow.set_tags({key: str(value) for key, value in tags.items()})


@_main_process_write
def log_artifact(path: Path, folder: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=folder)


@_main_process_write
def log_dataset(manifest: pd.DataFrame, source: str, name: str, fingerprint: str, context: str) -> None:
    """The manifest as an MLflow dataset input, with our content fingerprint as its digest."""
    with warnings.catch_warnings():
        # MLflow registers its local-folder source twice and warns that a path is ambiguous between them.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        dataset = mlflow.data.from_pandas(manifest, source=source, name=name, digest=fingerprint)
    try:
        mlflow.log_input(dataset, context=context)
    except MlflowException as error:
        # The store looks a dataset up, then inserts it: two runs logging the same new dataset at once race,
        # and the loser's insert breaks the unique key. The dataset exists by then, so a second call links it.
        if "already exists" not in str(error):
            raise
        mlflow.log_input(dataset, context=context)


def _serving_requirements() -> list[str]:
    return [f"{package}=={installed_version(package)}" for package in _SERVING_PACKAGES]


@_interrupts_held()
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
        model_config={"run_id": mlflow.active_run().info.run_id},
    )
    return info.model_uri


@_interrupts_held()
def register_model(model_uri: str, name: str, tags: dict[str, Any]) -> str:
    """A new version of registered model `name` from `model_uri`, tagged; returns the version number."""
    version = mlflow.register_model(model_uri, name, tags={key: str(value) for key, value in tags.items()})
    return str(version.version)


@_interrupts_held()
def delete_run_versions(name: str, run_id: str) -> None:
    """Delete every version of `name` registered from `run_id` (the clean-up after a failed registration)."""
    client = MlflowClient()
    for found in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        client.delete_model_version(name, found.version)


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
    """The version that `alias` points to, or None when the model or the alias does not exist yet.

    Only "not found" means None: any other failure (a locked database, a server down) is raised, so that
    `promote=auto` never mistakes an outage for "no production model yet".
    """
    try:
        found = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in _NOT_FOUND_CODES:
            return None
        raise
    return version_info(name, str(found.version))


@_interrupts_held()
def set_alias(name: str, version: str, alias: str = PRODUCTION_ALIAS) -> None:
    version_info(name, version)
    MlflowClient().set_registered_model_alias(name, alias, version)


def _break_stale_lock(client: MlflowClient, lock_name: str) -> str:
    """Who holds the lock; deletes it first if its holder took it PROMOTION_LOCK_STALE_SECONDS ago (it died)."""
    try:
        tags = client.get_registered_model(lock_name).tags
    except MlflowException:
        return "nobody (just released)"
    holder = tags.get("holder", "unknown")
    if time.time() - float(tags.get("acquired", "0")) > PROMOTION_LOCK_STALE_SECONDS:
        log.warning("breaking the promotion lock %s left by %s", lock_name, holder)
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(lock_name)
    return holder


@contextlib.contextmanager
def promotion_lock(name: str) -> Iterator[None]:
    """Hold the registry-wide lock for promoting versions of `name`: read production, decide, set the alias."""
    client, lock_name = MlflowClient(), name + PROMOTION_LOCK_SUFFIX
    holder = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + PROMOTION_LOCK_WAIT_SECONDS
    while True:
        try:
            client.create_registered_model(
                lock_name,
                tags={"holder": holder, "acquired": f"{time.time():.3f}"},
                description=f"held while a cifake run promotes a version of {name}; deleted right after",
            )
            break
        except MlflowException as error:
            if error.error_code not in {"RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"}:
                raise
            current_holder = _break_stale_lock(client, lock_name)
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"the promotion lock {lock_name!r} has been held by {current_holder} for over "
                    f"{PROMOTION_LOCK_WAIT_SECONDS:.0f} s: if no promotion is running, delete that registered model"
                ) from error
            time.sleep(random.uniform(0.1, 0.5))
    try:
        yield
    finally:
        client.delete_registered_model(lock_name)


def registered_version_of(run_id: str) -> str | None:
    """`NAME/VERSION` of the newest registered version made from `run_id`, or None if there is none or no store."""
    if not run_id or not (os.environ.get("MLFLOW_TRACKING_URI") or mlflow.is_tracking_uri_set()):
        return None  # never create a store just to look a model up
    try:
        versions = MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    except MlflowException:
        return None
    newest = max(versions, key=lambda found: int(found.version), default=None)
    return f"{newest.name}/{newest.version}" if newest else None


def pin_model_uri(model_uri: str) -> str:
    """`models:/NAME@ALIAS` as `models:/NAME/VERSION` (the version it points to now); other URIs unchanged."""
    configure_tracking()
    if model_uri.startswith("models:/") and "@" in model_uri:
        name, alias = model_uri.removeprefix("models:/").split("@", 1)
        found = alias_version(name, alias)
        if found is None:
            raise RegistryError(
                f"{model_uri} points nowhere: registered model {name!r} has no alias {alias!r}. Train one "
                f"(`mlflow run .`) or set it with `cifake promote --version N`"
            )
        return f"models:/{name}/{found['version']}"
    return model_uri


def load_pyfunc(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """The pyfunc model behind a `models:/` or `runs:/` URI; RegistryError naming the URI if there is none."""
    configure_tracking()
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as error:
        raise RegistryError(
            f"cannot load model {model_uri}: {getattr(error, 'message', error)}. Use models:/NAME/VERSION, "
            "models:/NAME@ALIAS or runs:/RUN_ID/model, and check MLFLOW_TRACKING_URI"
        ) from error


def _run_record(run: mlflow.entities.Run) -> dict[str, Any]:
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or "",
        "status": run.info.status,
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": {key: value for key, value in run.data.tags.items() if not key.startswith("mlflow.")},
    }


def experiment_runs(experiment_name: str) -> list[dict[str, Any]] | None:
    """Every run of an experiment, newest first, as plain dicts (run_id, run_name, status, start_time and end_time
    in ms, params, latest metrics, tags); None when the experiment does not exist."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    records: list[dict[str, Any]] = []
    page_token = None
    while True:
        page = client.search_runs(
            [experiment.experiment_id], order_by=["attributes.start_time DESC"], page_token=page_token
        )
        records.extend(_run_record(run) for run in page)
        page_token = page.token
        if not page_token:
            return records


def metric_histories(run_id: str, keys: Sequence[str]) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (step, value) history for one run; a metric the run never logged has an empty list."""
    client = MlflowClient()
    return {key: [(found.step, found.value) for found in client.get_metric_history(run_id, key)] for key in keys}


def run_json_artifact(run_id: str, artifact_path: str) -> Any | None:
    """A run's JSON artifact (`reports/curves.json`, `reports/metrics.json`, ...), or None when the run has none.

    Runs that failed or are still running lack their reports; callers show that instead of failing.
    """
    with tempfile.TemporaryDirectory(prefix="cifake-artifact-") as folder:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=folder)
            return json.loads(Path(local).read_text())
        except (MlflowException, OSError, ValueError) as error:
            log.info("run %s has no readable %s: %s", run_id, artifact_path, error)
            return None


def registered_versions(name: str) -> list[dict[str, Any]]:
    """Every version of registered model `name`, newest first: number, run, status, creation time (ms), tags and
    aliases; an empty list when the model does not exist."""
    client = MlflowClient()
    found = client.search_model_versions(f"name = '{name}'")
    # Searches do not return aliases in every store, so each version's aliases come from the registered model.
    aliases: dict[str, list[str]] = {}
    if found:
        for alias, version in client.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
    return [
        {
            "version": str(version.version),
            "run_id": version.run_id,
            "status": version.status,
            "creation_time": version.creation_timestamp,
            "tags": dict(version.tags),
            "aliases": sorted(aliases.get(str(version.version), [])),
        }
        for version in sorted(found, key=lambda version: int(version.version), reverse=True)
    ]


def store_problem() -> str | None:
    """Why the configured tracking store cannot be read (a bad URI, a locked or corrupt database, a server down),
    or None when it answers; lets a viewer say so once instead of failing on every query."""
    try:
        MlflowClient().search_experiments(max_results=1)
    except Exception as error:  # whatever the store's backend raises, the viewer shows it with the fix
        first_line = (str(getattr(error, "message", error)).strip().splitlines() or [""])[0]
        return f"{type(error).__name__}: {first_line[:500]}"
    return None


def download_checkpoint(model_uri: str, destination: Path) -> Path:
    """The PyTorch checkpoint (`checkpoint/best.pt`) logged by the run that made `model_uri`, downloaded into
    `destination`; RegistryError naming the URI when the model or its checkpoint cannot be found."""
    configure_tracking()
    try:
        run_id = mlflow.models.get_model_info(model_uri).run_id
    except (MlflowException, OSError) as error:
        raise RegistryError(
            f"cannot find model {model_uri}: {getattr(error, 'message', error)}. Use models:/NAME/VERSION, "
            "models:/NAME@ALIAS or runs:/RUN_ID/model, and check MLFLOW_TRACKING_URI"
        ) from error
    if not run_id:
        raise RegistryError(f"{model_uri} was not logged by a run, so no checkpoint to explain with goes with it")
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=str(destination)
        )
    except (MlflowException, OSError) as error:
        raise RegistryError(
            f"the run {run_id} behind {model_uri} has no {CHECKPOINT_ARTIFACT}, which explanations need: explain "
            "with a model trained by `cifake train`, which logs it"
        ) from error
    return Path(local)
