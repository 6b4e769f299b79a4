"""The Streamlit dashboard: its data shaping alone, then every page through Streamlit's AppTest on real stores.

The store of the page tests is made once per module by real training: two finished runs (v1 production, v2
registered but not promoted, at a different learning rate), one run that FAILED inside training and one left
RUNNING. Nothing of MLflow is mocked. An empty and an unreadable store need no training and are not `slow`.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import streamlit as st
from PIL import Image
from servers import using_store
from streamlit.testing.v1 import AppTest

from cifake_core import dashboard_data, pipeline, tracking
from cifake_core.config import load_config
from cifake_core.errors import PretrainedWeightsError

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "dashboard" / "app.py")
MODEL = "cifake-detector"
APP_TIMEOUT_S = 180  # the first run of a page imports plotly and loads the ONNX model on 2 shared cores


def _png(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _record(run_id: str, status: str = "FINISHED", **fields) -> dict:
    """A run as `tracking.experiment_runs` returns it."""
    return {
        "run_id": run_id,
        "run_name": "train",
        "status": status,
        "start_time": 1_700_000_000_000,
        "end_time": None if status == "RUNNING" else 1_700_000_090_000,
        "params": fields.get("params", {}),
        "metrics": fields.get("metrics", {}),
        "tags": {"cifake.stage": "train", **fields.get("tags", {})},
    }


# --- dashboard_data, pure ---------------------------------------------------------------------------------------


def test_runs_table_keeps_failed_and_running_runs_and_marks_production():
    runs = [
        _record("a" * 32, params={"lr": "0.002"}, metrics={"test_auc": 0.9}, tags={"cifake.registered_version": "2"}),
        _record("b" * 32, status="FAILED", tags={"cifake.error": "PretrainedWeightsError: no file"}),
        _record("c" * 32, status="RUNNING"),
    ]
    table = dashboard_data.runs_table(runs, production_version="2")
    assert table["status"].tolist() == ["FINISHED", "FAILED", "RUNNING"]
    assert table["production"].tolist() == [True, False, False]
    assert table.loc[0, "duration_s"] == 90 and np.isnan(table.loc[2, "duration_s"])
    assert np.isnan(table.loc[1, "test_auc"]) and table.loc[1, "error"].startswith("PretrainedWeightsError")
    assert table.loc[0, "run"] == "train aaaaaaaa v2"
    assert dashboard_data.default_comparison(table) == ["a" * 32]
    assert dashboard_data.runs_table([], None).columns.tolist() == list(dashboard_data.RUNS_COLUMNS)


def test_filter_runs_by_status_stage_and_text():
    table = dashboard_data.runs_table(
        [_record("a" * 32, tags={"cifake.dataset": "demo-v1"}), _record("b" * 32, status="FAILED")], None
    )
    assert dashboard_data.filter_runs(table, statuses=["FAILED"])["run_id"].tolist() == ["b" * 32]
    assert dashboard_data.filter_runs(table, stages=["promote"]).empty
    assert dashboard_data.filter_runs(table, text=" DEMO ")["run_id"].tolist() == ["a" * 32]
    assert len(dashboard_data.filter_runs(table)) == 2


def test_parameter_diff_puts_and_marks_differing_parameters_first():
    runs = [
        _record("a" * 32, params={"epochs": "1", "lr": "0.002"}),
        _record("b" * 32, params={"epochs": "1", "lr": "0.001", "seed": "7"}),
    ]
    diff = dashboard_data.parameter_diff(runs)
    assert diff.index.tolist()[-1] == "epochs"
    assert diff["differs"].to_dict() == {"lr": True, "seed": True, "epochs": False}
    assert diff.loc["seed"].tolist()[:2] == ["", "7"]
    styles = dashboard_data.highlight_differences(diff).to_html()
    assert "background-color" in styles
    assert dashboard_data.parameter_diff([]).empty


def test_runs_compare_on_the_values_they_trained_with_not_the_automatic_ones_logged():
    from_mlflow_run = _record(
        "a" * 32, params={"batch_size": "0", "lr": "0.004"}, tags={"cifake.used.batch_size": "128"}
    )
    from_cifake_train = _record("b" * 32, params={"batch_size": "128", "lr": "0.004"})
    assert dashboard_data.used_params(from_mlflow_run) == {"batch_size": "128", "lr": "0.004"}
    assert not dashboard_data.parameter_diff([from_mlflow_run, from_cifake_train])["differs"].any()
    assert dashboard_data.runs_table([from_mlflow_run], None)["batch_size"].tolist() == ["128"]


def test_curves_and_bars_in_long_form_and_runs_without_reports_named():
    frame = dashboard_data.epoch_curves({"run a": {"val_auc": [(1, 0.5), (2, 0.7)], "learning_rate": []}})
    assert frame.to_dict("records") == [
        {"run": "run a", "metric": "val_auc", "epoch": 1, "value": 0.5},
        {"run": "run a", "metric": "val_auc", "epoch": 2, "value": 0.7},
    ]
    roc, missing = dashboard_data.roc_curves({"run a": {"roc": {"fpr": [0, 1], "tpr": [0, 1]}}, "run b": None})
    assert roc["run"].tolist() == ["run a", "run a"] and missing == ["run b"]
    bars = dashboard_data.metric_bars([_record("a" * 32, metrics={"test_auc": 0.8, "train_loss": 0.1}), _record("b")])
    assert bars.to_dict("records") == [{"run": "train aaaaaaaa", "metric": "test_auc", "value": 0.8}]


def test_versions_table_promotion_verbs_and_results():
    versions = [
        {
            "version": "2",
            "run_id": "r2",
            "status": "READY",
            "creation_time": 1,
            "tags": {"val_auc": "0.7"},
            "aliases": [],
        },
        {"version": "1", "run_id": "r1", "status": "READY", "creation_time": 1, "tags": {}, "aliases": ["production"]},
    ]
    table = dashboard_data.versions_table(versions, [_record("r1", metrics={"test_auc": 0.6, "test_f1": 0.5})])
    assert table["production"].tolist() == [False, True]
    assert table.loc[0, "val_auc"] == 0.7 and table.loc[1, "test_f1"] == 0.5 and np.isnan(table.loc[0, "test_f1"])
    assert dashboard_data.production_version(versions) == "1"
    assert dashboard_data.production_version(versions[:1]) is None
    verbs = [dashboard_data.promotion_verb(v, p) for v, p in [("2", "1"), ("1", "2"), ("1", "1"), ("1", None)]]
    assert verbs == ["promote", "roll back", "keep", "promote"]
    results = dashboard_data.results_table(["a.png"], pd.DataFrame({"prob_ai": [0.3], "label": ["real"]}))
    assert results.columns.tolist() == ["file", "prob_ai", "label"]
    assert dashboard_data.preview(_png((1, 2, 3), (600, 300))).size == (256, 128)


# --- the app against real stores -----------------------------------------------------------------------------------


def _use_store(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture(autouse=True)
def _keep_main_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """AppTest installs the app script as `__main__`; left there, processes spawned by later tests (the data and
    robustness worker pools) would re-run it and fail to import `cached_store`."""
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])


def _app(page: str | None = None) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=APP_TIMEOUT_S).run()
    if page:
        app.switch_page(f"pages/{page}.py").run()
    assert not app.exception, [error.value for error in app.exception]
    return app


def _texts(app: AppTest, kind: str) -> str:
    return "\n".join(str(element.value) for element in app.get(kind))


@pytest.fixture(scope="module")
def dashboard_store(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Two trained versions (v1 production), a run that failed inside training and one still RUNNING."""
    base = {"data_dir": str(tiny_demo), "epochs": "2", "batch_size": "16", "num_workers": "0"}
    with using_store(f"sqlite:///{tmp_path_factory.mktemp('dashboard') / 'mlflow.db'}") as uri:
        first = pipeline.train(load_config(None, base))
        second = pipeline.train(load_config(None, {**base, "lr": "0.001", "promote": "never"}))
        not_weights = tmp_path_factory.mktemp("weights") / "weights.pth"
        not_weights.write_text("not a checkpoint")
        with pytest.raises(PretrainedWeightsError):
            pipeline.train(load_config(None, {**base, "pretrained_weights": str(not_weights)}))
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name("cifake")
        running = client.create_run(experiment.experiment_id, run_name="train", tags={"cifake.stage": "train"})
        client.log_metric(running.info.run_id, "train_loss", 0.69, step=1)
        yield {"uri": uri, "v1_run": first.run_id, "v2_run": second.run_id, "running": running.info.run_id}


@pytest.fixture
def store(dashboard_store: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    _use_store(dashboard_store["uri"], monkeypatch)
    assert tracking.alias_version(MODEL)["version"] == "1", "an earlier test left production elsewhere"
    return dashboard_store


@pytest.mark.slow
def test_runs_page_shows_every_run_as_it_is(store: dict[str, str]):
    app = _app()
    table = app.dataframe[0].value
    assert sorted(table["status"]) == ["FAILED", "FINISHED", "FINISHED", "RUNNING"]
    assert table.loc[table["run_id"] == store["v1_run"], "production"].tolist() == [True]
    assert table.loc[table["run_id"] == store["v2_run"], "version"].tolist() == ["2"]
    failed = table[table["status"] == "FAILED"].iloc[0]
    assert "PretrainedWeightsError" in failed["error"] and failed["fingerprint"]
    assert (table["test_auc"] > 0).sum() == 2


@pytest.mark.slow
def test_runs_page_compares_two_runs_and_then_a_failed_and_a_running_one(store: dict[str, str]):
    app = _app()
    compare = next(m for m in app.multiselect if m.label == "Compare runs")
    assert sorted(compare.value) == sorted([store["v1_run"], store["v2_run"]])  # the newest finished trainings
    assert len(app.get("plotly_chart")) == 3  # epoch curves, ROC, test metric bars
    parameters = app.dataframe[1].value
    assert parameters.loc["lr", "differs"] and not parameters.loc["epochs", "differs"]
    assert not app.warning

    failed_id = app.dataframe[0].value.query("status == 'FAILED'")["run_id"].iloc[0]
    compare.set_value([store["v1_run"], failed_id, store["running"]]).run()
    assert not app.exception, [error.value for error in app.exception]
    warnings = _texts(app, "warning")
    assert "is FAILED: cifake_core.errors.PretrainedWeightsError" in warnings and "is RUNNING" in warnings
    assert "No `reports/curves.json`" in _texts(app, "caption")
    assert len(app.get("plotly_chart")) == 3  # the finished run's ROC and bars are still drawn


@pytest.mark.slow
def test_runs_page_filters(store: dict[str, str]):
    app = _app()
    status = next(m for m in app.multiselect if m.label == "Status")
    status.set_value(["FAILED"]).run()
    assert app.dataframe[0].value["status"].tolist() == ["FAILED"]
    assert "Select two or more runs" in _texts(app, "info")
    status.set_value([]).run()
    app.text_input[0].input("no run has this text").run()
    assert app.dataframe[0].value.empty and "No run matches these filters" in _texts(app, "warning")


@pytest.mark.slow
def test_models_page_lists_versions_with_production(store: dict[str, str]):
    app = _app("models")
    table = app.dataframe[0].value
    assert table["version"].tolist() == ["2", "1"]
    assert table["production"].tolist() == [False, True] and table["aliases"].tolist() == ["", "production"]
    assert table["test_auc"].notna().all() and table["run_id"].tolist() == [store["v2_run"], store["v1_run"]]
    assert "dataset_fingerprint=" in table.loc[0, "tags"]
    assert "**Production:** `cifake-detector` v1" in _texts(app, "markdown")


def _promote_through_the_page(app: AppTest, version: str, button: str) -> None:
    app.selectbox[0].set_value(version).run()
    next(b for b in app.button if b.label == button).click().run()
    assert tracking.alias_version(MODEL)["version"] != version, "moved before the confirmation"
    next(b for b in app.button if b.label == "Confirm").click().run()
    assert not app.exception, [error.value for error in app.exception]


@pytest.mark.slow
def test_promotion_and_rollback_after_confirmation_and_classify_follows(store: dict[str, str]):
    app = _app("models")
    app.selectbox[0].set_value("2").run()
    next(b for b in app.button if b.label == "Promote to v2...").click().run()
    assert "will point to v2 instead of v1" in _texts(app, "warning")
    next(b for b in app.button if b.label == "Cancel").click().run()
    assert not any(b.label == "Confirm" for b in app.button)
    assert tracking.alias_version(MODEL)["version"] == "1"

    classify = _app("classify")
    assert "v1** (production)" in _texts(classify, "markdown")
    _promote_through_the_page(app, "2", "Promote to v2...")
    assert tracking.alias_version(MODEL)["version"] == "2"
    assert "`cifake-detector@production`: v1 -> v2" in _texts(app, "success")
    assert app.dataframe[0].value["production"].tolist() == [True, False]
    promotions = [run for run in tracking.experiment_runs("cifake") if run["tags"].get("cifake.stage") == "promote"]
    assert promotions[0]["status"] == "FINISHED" and promotions[0]["tags"]["cifake.promoted_version"] == "2"
    classify.run()  # the same session, without restarting the app: the new version answers
    assert "v2** (production)" in _texts(classify, "markdown") and store["v2_run"] in _texts(classify, "markdown")

    _promote_through_the_page(app, "1", "Roll back to v1...")
    assert tracking.alias_version(MODEL)["version"] == "1"
    assert "v2 -> v1" in _texts(app, "success")


@pytest.mark.slow
def test_classify_uploads_a_batch_with_a_broken_file(store: dict[str, str]):
    app = _app("classify")
    answering = _texts(app, "markdown")
    assert "`cifake-detector` v1** (production)" in answering and store["v1_run"] in answering
    assert "test AUC 0." in answering or "test AUC 1." in answering
    uploader = app.file_uploader[0]
    uploader.upload("red.png", _png((200, 30, 30)), "image/png")
    uploader.upload("noise.jpg", _jpeg(1), "image/jpeg")
    uploader.upload("broken.png", _png((0, 0, 0))[:40], "image/png")
    app.run()
    assert not app.exception, [error.value for error in app.exception]
    results = app.dataframe[0].value
    assert results["file"].tolist() == ["red.png", "noise.jpg", "broken.png"]
    assert results["label"].tolist()[:2] in ([a, b] for a in ("ai", "real") for b in ("ai", "real"))
    assert results["label"].tolist()[2] == "error" and "not an image" in results["error"].tolist()[2]
    assert set(results["model_version"]) == {"cifake-detector/1"}
    assert "**broken.png**: not an image" in _texts(app, "error")
    shown = _texts(app, "markdown")
    assert "**red.png**: `" in shown and "**noise.jpg**: `" in shown and "threshold f1 = " in shown
    assert app.get("download_button")

    app.selectbox[0].set_value("0.5").run()
    assert set(app.dataframe[0].value["threshold"].dropna()) == {0.5}
    assert "threshold 0.5 = 0.5000" in _texts(app, "markdown")


@pytest.mark.slow
def test_classify_shows_a_grad_cam_heatmap_beside_each_classified_image(store: dict[str, str]):
    app = _app("classify")
    uploader = app.file_uploader[0]
    uploader.upload("red.png", _png((200, 30, 30)), "image/png")
    uploader.upload("broken.png", _png((0, 0, 0))[:40], "image/png")
    app.run()
    assert len(app.get("image")) == 1  # the classified image; the broken one has its error instead
    app.toggle[0].set_value(True).run()
    assert not app.exception, [error.value for error in app.exception]
    assert len(app.get("image")) == 2  # and now its heatmap


@pytest.mark.slow
def test_the_dashboard_path_never_imports_torch(store: dict[str, str]):
    """Reading runs and classifying an upload load onnxruntime only; torch is for training (and promotion)."""
    script = f"""
import sys
from streamlit.testing.v1 import AppTest
app = AppTest.from_file({APP!r}, default_timeout={APP_TIMEOUT_S}).run()
app.switch_page("pages/classify.py").run()
app.file_uploader[0].upload("red.png", {_png((200, 30, 30))!r}, "image/png")
app.run()
assert not app.exception and app.dataframe[0].value["label"][0] in ("ai", "real"), app
print("torch imported:", "torch" in sys.modules)
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"]}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch imported: False" in done.stdout


def test_an_empty_store_explains_how_to_fill_each_page(tracking_store: str, monkeypatch: pytest.MonkeyPatch):
    _use_store(tracking_store, monkeypatch)
    assert "has no runs" in _texts(_app(), "info")
    assert "No version of `cifake-detector` is registered" in _texts(_app("models"), "info")
    assert "There is no production model yet" in _texts(_app("classify"), "info")


def test_an_unreadable_store_is_one_message_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    garbage = tmp_path / "mlflow.db"
    garbage.write_text("this is not a database")
    _use_store(f"sqlite:///{garbage}", monkeypatch)
    app = _app()
    assert "cannot be read" in _texts(app, "error") and "MLFLOW_TRACKING_URI" in _texts(app, "error")
    assert not app.title  # the page itself never ran
