"""The tracking store as the dashboard pages read it: `cifake_core.tracking` queries behind Streamlit's caches.

Every cache is keyed by the tracking URI, so two stores never share answers. Run and registry queries are
cached for QUERY_TTL_S seconds (a new run or a promotion shows up within that, or at once after a promotion
from the Models page, which clears them). The production model is cached by the pinned `models:/NAME/VERSION`
it was loaded from, so a promotion loads the new version on the next rerun without restarting the app.

Usage:
    import cached_store as store
    runs = store.runs(store.connect())
"""

from __future__ import annotations

import os
import threading
from typing import Any

import streamlit as st

from cifake_core import tracking
from cifake_core.config import RunConfig
from cifake_core.dashboard_data import EPOCH_METRICS
from cifake_core.predict import load_checkpoint_model, load_scorer
from cifake_core.pyfunc_model import CifakeOnnxModel

EXPERIMENT = RunConfig().publish.experiment_name
MODEL = RunConfig().publish.registered_model_name
PRODUCTION_URI = f"models:/{MODEL}@{tracking.PRODUCTION_ALIAS}"
QUERY_TTL_S = 15


def connect() -> str:
    """Point MLflow at the store of MLFLOW_TRACKING_URI (default: the project's mlflow.db) and return its URI."""
    # The dashboard downloads small JSON reports; MLflow's progress bars would only clutter the server's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return tracking.configure_tracking()


@st.cache_data(ttl=QUERY_TTL_S, show_spinner=False)
def problem(tracking_uri: str) -> str | None:
    return tracking.store_problem()


@st.cache_data(ttl=QUERY_TTL_S, show_spinner=False)
def runs(tracking_uri: str) -> list[dict[str, Any]] | None:
    return tracking.experiment_runs(EXPERIMENT)


@st.cache_data(ttl=QUERY_TTL_S, show_spinner=False)
def versions(tracking_uri: str) -> list[dict[str, Any]]:
    return tracking.registered_versions(MODEL)


@st.cache_data(ttl=QUERY_TTL_S, show_spinner=False)
def histories(tracking_uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return tracking.metric_histories(run_id, EPOCH_METRICS)


@st.cache_data(ttl=QUERY_TTL_S, show_spinner=False)
def report(tracking_uri: str, run_id: str, artifact_path: str) -> Any | None:
    return tracking.run_json_artifact(run_id, artifact_path)


def forget_queries() -> None:
    """Drop the cached run and registry answers, after this app changed the registry."""
    for query in (runs, versions):
        query.clear()


@st.cache_resource(show_spinner="Loading the production model...", max_entries=4)
def scorer(tracking_uri: str, pinned_uri: str) -> CifakeOnnxModel:
    return load_scorer(pinned_uri)


@st.cache_resource(show_spinner="Loading the run's PyTorch checkpoint for Grad-CAM...", max_entries=2)
def explainer(tracking_uri: str, pinned_uri: str) -> tuple[Any, threading.Lock]:
    """The production version's checkpoint model, and a lock: Grad-CAM hooks into the model, so the sessions
    that share it take turns."""
    return load_checkpoint_model(pinned_uri), threading.Lock()
