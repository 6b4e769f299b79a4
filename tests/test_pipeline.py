"""End to end on tiny generated data: train -> log -> register -> promote -> serve, and every way a run can end.

Each test gets its own SQLite MLflow store (`tracking_store`). Runs that train are marked `slow`.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image
from sqlalchemy import event
from sqlalchemy.engine import Engine

from cifake_core import launch, pipeline, tracking
from cifake_core.cli import _raise_keyboard_interrupt, main
from cifake_core.config import BATCH_SIZE, DataConfig, TrainConfig, load_config
from cifake_core.data import MANIFEST_FILE, write_split_files
from cifake_core.errors import LAUNCH_FOLDER_VARIABLE
from cifake_core.models import create_model, load_checkpoint
from cifake_core.onnx_runtime import INPUT_NAME, OUTPUT_NAME, onnx_session
from cifake_core.preprocessing import preprocess_image
from cifake_core.robustness import PERTURBATIONS
from tests.servers import child_environment

ROOT = Path(__file__).resolve().parents[1]
MODEL = "cifake-detector"


def _config(data_dir: Path, **overrides: str):
    values = {"data_dir": str(data_dir), "epochs": "1", "batch_size": "16", "num_workers": "0", **overrides}
    return load_config(None, values)


def _png_base64(size: tuple[int, int], color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _artifact_paths(client: MlflowClient, run_id: str, folder: str = "") -> set[str]:
    paths: set[str] = set()
    for item in client.list_artifacts(run_id, folder or None):
        paths |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return paths


def _versions() -> list[str]:
    return sorted(str(v.version) for v in MlflowClient().search_model_versions(f"name='{MODEL}'"))


def _production() -> str | None:
    try:
        return str(MlflowClient().get_model_version_by_alias(MODEL, "production").version)
    except mlflow.exceptions.MlflowException:
        return None


@pytest.mark.parametrize(
    ("mode", "production", "expected"),
    [
        ("never", None, False),
        ("always", {"version": "1", "tags": {"dataset_fingerprint": "other", "val_auc": "0.99"}}, True),
        ("auto", None, True),
        ("auto", {"version": "1", "tags": {"dataset_fingerprint": "fp", "val_auc": "0.80"}}, True),
        ("auto", {"version": "1", "tags": {"dataset_fingerprint": "fp", "val_auc": "0.90"}}, False),
        ("auto", {"version": "1", "tags": {"dataset_fingerprint": "fp", "val_auc": "0.85"}}, False),
        ("auto", {"version": "1", "tags": {"dataset_fingerprint": "other", "val_auc": "0.10"}}, False),
    ],
)
def test_promotion_rule(mode, production, expected):
    promote, reason = pipeline.promotion_decision(mode, 0.85, "fp", production)
    assert promote is expected
    assert reason


@pytest.mark.slow
def test_training_logs_registers_promotes_and_serves(tiny_demo: Path, tracking_store: str):
    result = pipeline.train(_config(tiny_demo))
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "1" and run.data.params["data_dir"] == str(tiny_demo)
    expected_metrics = {
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "val_auc",
        "val_f1",
        "learning_rate",
        "epoch_seconds",
        "images_per_second",
        "test_auc",
        "test_f1",
        "test_accuracy",
        "test_precision",
        "test_recall",
        "onnx_max_abs_diff",
        "best_val_auc",
        "temperature",
        "test_ece",
        "test_ece_uncalibrated",
        "test_nll",
        "test_nll_uncalibrated",
        *(f"robust_{p.name}_{figure}" for p in PERTURBATIONS for figure in ("auc", "fpr")),
    }
    assert expected_metrics <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(result.run_id, "val_auc")] == [1]
    expected_artifacts = {
        "config.yaml",
        "data/manifest.csv",
        "data/dataset_summary.json",
        "reports/metrics.json",
        "reports/thresholds.json",
        "reports/curves.json",
        "reports/roc.png",
        "reports/pr.png",
        "reports/confusion_matrix.png",
        "onnx/model.onnx",
        "checkpoint/best.pt",
        "reports/robustness.json",
        "reports/robustness.png",
        "reports/calibration.json",
        "reports/reliability.png",
    }
    assert expected_artifacts <= _artifact_paths(client, result.run_id)
    summary = json.loads(Path(client.download_artifacts(result.run_id, "data/dataset_summary.json")).read_text())
    assert run.inputs.dataset_inputs[0].dataset.digest == summary["fingerprint"]

    assert (result.version, result.promoted) == ("1", True)
    version = client.get_model_version(MODEL, "1")
    assert version.run_id == result.run_id
    assert {"val_auc", "test_auc", "dataset_fingerprint", "image_size", "weights_source"} <= set(version.tags)
    assert _production() == "1"
    # One figure for the kept model everywhere: the metric, the version's tag (promotion compares it), metrics.json.
    report = json.loads(Path(client.download_artifacts(result.run_id, "reports/metrics.json")).read_text())
    best_val_auc = run.data.metrics["best_val_auc"]
    assert best_val_auc == float(version.tags["val_auc"]) == report["best_val_auc"] == result.metrics["best_val_auc"]

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@production")
    assert model.metadata.signature.inputs.input_names() == ["image"]
    assert model.metadata.saved_input_example_info is not None
    images = [_png_base64((100, 60), (200, 30, 30)), _png_base64((32, 32), (10, 120, 240))]
    answer = model.predict(pd.DataFrame({"image": images}))
    thresholds = json.loads(Path(client.download_artifacts(result.run_id, "reports/thresholds.json")).read_text())
    default_value = thresholds["thresholds"][thresholds["default"]]["value"]
    assert list(answer.columns) == ["prob_ai", "label", "threshold", "error", "model_version"]
    assert set(answer["model_version"]) == {f"{MODEL}/1"}
    assert answer["threshold"].tolist() == [default_value, default_value]
    assert set(answer["label"]) <= {"ai", "real"} and (answer["error"] == "").all()
    onnx_path = client.download_artifacts(result.run_id, "onnx/model.onnx")
    direct = onnx_session(Path(onnx_path)).run(
        [OUTPUT_NAME], {INPUT_NAME: np.stack([preprocess_image(base64.b64decode(i), 32) for i in images])}
    )[0]
    np.testing.assert_allclose(answer["prob_ai"].to_numpy(), direct, atol=1e-6)
    strict = model.predict(pd.DataFrame({"image": images}), params={"threshold": "fpr_1pct"})
    assert strict["threshold"].iloc[0] == thresholds["thresholds"]["fpr_1pct"]["value"]
    with pytest.raises(Exception, match="threshold must be one of"):
        model.predict(pd.DataFrame({"image": images}), params={"threshold": "banana"})

    kept_out = pipeline.train(_config(tiny_demo, promote="never"))
    assert (kept_out.version, kept_out.promoted, _production()) == ("2", False, "1")
    forced = pipeline.train(_config(tiny_demo, promote="always"))
    assert (forced.version, forced.promoted, _production()) == ("3", True, "3")
    assert pipeline.promote(MODEL, "1", "cifake") == "3"  # a rollback
    assert _production() == "1"

    metrics = pipeline.evaluate_model(f"models:/{MODEL}/2", _config(tiny_demo))
    assert 0.0 <= metrics["test_auc"] <= 1.0
    assert {"test_f1", "test_ece", "test_nll", "robust_jpeg50_auc"} <= set(metrics)


@pytest.mark.slow
def test_a_failing_run_ends_failed_and_registers_nothing(tiny_demo: Path, tracking_store: str, monkeypatch):
    def broken_epoch(*args, **kwargs):
        raise RuntimeError("disk full while training")

    monkeypatch.setattr(pipeline, "train_one_epoch", broken_epoch)
    with pytest.raises(RuntimeError, match="disk full"):
        pipeline.train(_config(tiny_demo))
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("cifake").experiment_id])
    assert run.info.status == "FAILED"
    assert "disk full" in run.data.tags["cifake.error"]
    assert _versions() == []


@pytest.mark.slow
def test_the_epoch_gets_the_configured_training_settings(tiny_demo: Path, tracking_store: str, monkeypatch):
    """batch_size=0 trains and logs the size this device gets; label_smoothing, grad_clip_norm and translate reach
    the epoch, a coarse epoch trains at a stride-2 stem; the one-cycle schedule counts the steps the epochs make."""
    calls = []

    def first_epoch(model, images, labels, order, optimizer, scheduler, batch_size, *args, **kwargs):
        stem_stride = getattr(model, "module", model).backbone.conv_stem.stride
        calls.append(
            {
                "batch_size": batch_size,
                "images": len(order),
                "schedule": scheduler.total_steps,
                "stem_stride": stem_stride,
                **kwargs,
            }
        )
        raise RuntimeError("stopped at the first epoch")

    monkeypatch.setattr(pipeline, "train_one_epoch", first_epoch)
    settings = {
        "batch_size": "0",
        "device": "cpu",
        "label_smoothing": "0.1",
        "grad_clip_norm": "2.5",
        "translate": "3",
        "epochs": "2",
        "fine_epochs": "1",
    }
    with pytest.raises(RuntimeError, match="stopped at the first epoch"):
        pipeline.train(_config(tiny_demo, **settings))
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("cifake").experiment_id])
    assert run.data.params["batch_size"] == str(BATCH_SIZE)
    (call,) = calls
    assert (call["batch_size"], call["label_smoothing"], call["grad_clip_norm"], call["translate"]) == (
        BATCH_SIZE,
        0.1,
        2.5,
        3,
    )
    assert call["stem_stride"] == (2, 2)
    assert call["schedule"] == 2  # two epochs of one step each
    # One image more than a batch: the lone trailing image makes no step, so the schedule counts one step.
    with pytest.raises(RuntimeError, match="stopped at the first epoch"):
        pipeline.train(_config(tiny_demo, batch_size=str(call["images"] - 1), device="cpu"))
    assert calls[-1]["schedule"] == 1


def _train_epochs_on_noise(
    tmp_path: Path,
    monkeypatch,
    val_aucs: list[float],
    train: TrainConfig,
    stem_stride: int,
    flip_tta: bool = False,
    judged: list[tuple[bool, tuple[int, int]]] | None = None,
):
    """`pipeline._train_epochs` on 8 random images, the validated epochs scored `val_aucs` in turn: the model, the
    kept epoch's metrics and the checkpoint's path. `judged` collects the model's `flip_tta` and stem stride at each
    evaluation."""
    scores = iter(val_aucs)

    def scored(model, *args, **kwargs):
        if judged is not None:
            judged.append((model.flip_tta, model.backbone.conv_stem.stride))
        return {"val_auc": next(scores), "val_loss": 0.5, "val_f1": 0.5}

    monkeypatch.setattr(pipeline, "evaluate", scored)
    monkeypatch.setattr(pipeline.tracking, "log_metrics", lambda *args, **kwargs: None)
    model, _ = create_model("false", "", stem_stride=stem_stride, flip_tta=flip_tta)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 4)
    checkpoint = tmp_path / "best.pt"
    splits = {"train": (images, labels), "val": (images, labels)}
    config = {"stem_stride": stem_stride}
    best = pipeline._train_epochs(model, splits, torch.device("cpu"), train, stem_stride, 0, checkpoint, config)
    return model, best, checkpoint


def test_the_epoch_loop_ends_holding_the_best_epochs_weights(tmp_path: Path, monkeypatch):
    """Val and test are scored after training with the model in memory: it must be the checkpointed best epoch,
    here the first, not the last."""
    weights_after_each_epoch = []

    def recorded_epoch(model, *args, **kwargs):
        metrics = real_epoch(model, *args, **kwargs)
        weights_after_each_epoch.append({name: tensor.clone() for name, tensor in model.state_dict().items()})
        return metrics

    real_epoch = pipeline.train_one_epoch
    monkeypatch.setattr(pipeline, "train_one_epoch", recorded_epoch)
    train = TrainConfig(epochs=2, fine_epochs=0, batch_size=4, device="cpu", num_workers=0)
    model, best, checkpoint = _train_epochs_on_noise(tmp_path, monkeypatch, [0.9, 0.5], train, stem_stride=2)
    assert best["epoch"] == 1 and len(weights_after_each_epoch) == 2
    first, last = weights_after_each_epoch
    saved = load_checkpoint(checkpoint)[0].state_dict()
    assert not torch.equal(first["backbone.conv_head.weight"], last["backbone.conv_head.weight"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, first[name]) and torch.equal(tensor, saved[name]), name


def test_epochs_are_judged_on_one_view_and_the_model_keeps_flip_tta(tmp_path: Path, monkeypatch):
    """Validation after each epoch scores the images without their mirror (half the cost); the model leaves the
    loop with flip_tta on, as it is scored after training and exported."""
    judged: list[tuple[bool, tuple[int, int]]] = []
    train = TrainConfig(epochs=2, fine_epochs=0, batch_size=4, device="cpu", num_workers=0)
    model, best, _ = _train_epochs_on_noise(
        tmp_path, monkeypatch, [0.5, 0.9], train, stem_stride=2, flip_tta=True, judged=judged
    )
    assert judged == [(False, (2, 2)), (False, (2, 2))]
    assert model.flip_tta and best["epoch"] == 2


@pytest.mark.parametrize(
    ("epochs", "fine_epochs", "stem_stride", "expected"),
    [(22, 10, 1, 12), (16, 15, 1, 1), (8, 10, 1, 0), (1, 10, 1, 0), (10, 10, 1, 0), (3, 0, 1, 0), (22, 10, 2, 0)],
)
def test_the_epochs_before_the_fine_ones_are_coarse(epochs, fine_epochs, stem_stride, expected):
    assert pipeline.coarse_epoch_count(epochs, fine_epochs, stem_stride) == expected


def test_coarse_epochs_train_at_stride_2_and_are_neither_validated_nor_kept(tmp_path: Path, monkeypatch):
    """fine_epochs=1 of 3: two epochs at a stride-2 stem, then one at stride 1. Only the stride-1 epoch is validated
    (a coarse one is never kept: the model is exported at stride 1) and kept, and the model ends at stride 1."""
    strides = []

    def recorded_epoch(model, *args, **kwargs):
        strides.append(model.backbone.conv_stem.stride)
        return real_epoch(model, *args, **kwargs)

    real_epoch = pipeline.train_one_epoch
    monkeypatch.setattr(pipeline, "train_one_epoch", recorded_epoch)
    train = TrainConfig(epochs=3, fine_epochs=1, batch_size=4, device="cpu", num_workers=0)
    judged: list[tuple[bool, tuple[int, int]]] = []
    model, best, checkpoint = _train_epochs_on_noise(tmp_path, monkeypatch, [0.5], train, stem_stride=1, judged=judged)
    assert strides == [(2, 2), (2, 2), (1, 1)] and judged == [(False, (1, 1))]
    assert best["epoch"] == 3 and best["val_auc"] == 0.5
    assert model.backbone.conv_stem.stride == (1, 1)
    restored, metadata = load_checkpoint(checkpoint)
    assert metadata["epoch"] == 3 and restored.backbone.conv_stem.stride == (1, 1)


def test_epochs_after_the_first_train_on_select_fraction_of_the_images(tmp_path: Path, monkeypatch):
    """select_fraction=0.5 on 8 images: the first epoch trains on all 8, each later one on 4 different images,
    drawn from the latest loss of every image (an image left out keeps its older loss); the one-cycle schedule
    spans exactly the steps taken (OneCycleLR raises when stepped past its end) and ends annealed."""
    orders, learning_rates, losses_drawn_from = [], [], []

    def recorded_epoch(model, images, labels, order, *args, **kwargs):
        orders.append(order.tolist())
        assert torch.all(kwargs["sample_losses"] == 0)
        metrics = real_epoch(model, images, labels, order, *args, **kwargs)
        learning_rates.append(metrics["learning_rate"])
        # Losses that say which epoch recorded them: 10 x epoch + the image's index.
        kwargs["sample_losses"][order] = 10.0 * len(orders) + order.float()
        return metrics

    def recorded_selection(losses, fraction, generator):
        losses_drawn_from.append(losses.clone())
        return real_selection(losses, fraction, generator)

    real_epoch, real_selection = pipeline.train_one_epoch, pipeline.select_hard_examples
    monkeypatch.setattr(pipeline, "train_one_epoch", recorded_epoch)
    monkeypatch.setattr(pipeline, "select_hard_examples", recorded_selection)
    train = TrainConfig(epochs=3, select_fraction=0.5, batch_size=2, device="cpu", num_workers=0)
    _train_epochs_on_noise(tmp_path, monkeypatch, [0.5, 0.6, 0.7], train, stem_stride=2)
    assert sorted(orders[0]) == list(range(8))
    assert [len(set(order)) for order in orders] == [8, 4, 4]
    images = torch.arange(8.0)
    assert torch.equal(losses_drawn_from[0], 10.0 + images)
    retrained = torch.isin(torch.arange(8), torch.tensor(orders[1]))
    assert torch.equal(losses_drawn_from[1], torch.where(retrained, 20.0 + images, 10.0 + images))
    # 4 + 2 + 2 steps end at 0.08 lr; a schedule sized for 3 full epochs (12 steps) would stop at 0.28 lr.
    assert learning_rates[-1] < train.lr * 0.1


@pytest.mark.slow
def test_ctrl_c_ends_the_run_killed(tiny_demo: Path, tracking_store: str, monkeypatch):
    def interrupted_epoch(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train_one_epoch", interrupted_epoch)
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(_config(tiny_demo))
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("cifake").experiment_id])
    assert run.info.status == "KILLED"


@pytest.mark.slow
def test_a_failure_after_registration_deletes_the_new_version(tiny_demo: Path, tracking_store: str, monkeypatch):
    def broken_rule(*args, **kwargs):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(pipeline, "promotion_decision", broken_rule)
    with pytest.raises(RuntimeError, match="registry went away"):
        pipeline.train(_config(tiny_demo))
    assert _versions() == []
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("cifake").experiment_id])
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_a_failure_after_promotion_puts_production_back(tiny_demo: Path, tracking_store: str, monkeypatch):
    assert pipeline.train(_config(tiny_demo)).version == "1"
    real_set_tags = pipeline.tracking.set_tags

    def failing_set_tags(tags):
        if "cifake.registered_version" in tags:
            raise RuntimeError("tracking server went away")
        real_set_tags(tags)

    monkeypatch.setattr(pipeline.tracking, "set_tags", failing_set_tags)
    with pytest.raises(RuntimeError, match="went away"):
        pipeline.train(_config(tiny_demo, promote="always"))
    assert _versions() == ["1"] and _production() == "1"


def test_a_run_lands_in_its_experiment_when_another_process_just_created_it(tracking_store: str, monkeypatch):
    experiment_id = MlflowClient().create_experiment("raced")
    # What the losing process of a creation race sees: no experiment yet, then "already exists" on creating it.
    service = mlflow.tracking._tracking_service.client.TrackingServiceClient
    real_lookup, first_lookup = service.get_experiment_by_name, [True]

    def lookup(self, name: str):
        if first_lookup.pop() if first_lookup else False:
            return None
        return real_lookup(self, name)

    monkeypatch.setattr(service, "get_experiment_by_name", lookup)
    with tracking.tracked_run("raced", "train") as run_id:
        pass
    monkeypatch.undo()
    assert not first_lookup  # the race path was taken
    assert MlflowClient().get_run(run_id).info.experiment_id == experiment_id


def test_params_mlflow_run_logged_as_typed_keep_that_value_and_only_other_values_are_tagged(
    tracking_store: str, monkeypatch
):
    client = MlflowClient()
    started = client.create_run(client.create_experiment("cifake"))  # as `mlflow run` starts it
    for name, typed in {"batch_size": "0", "lr": "4e-3", "weight_decay": "0.050"}.items():
        client.log_param(started.info.run_id, name, typed)
    monkeypatch.setenv("MLFLOW_RUN_ID", started.info.run_id)
    with tracking.tracked_run("cifake", "train") as run_id:
        tracking.log_params({"batch_size": 128, "lr": 0.004, "weight_decay": 0.05, "seed": 42})
    run = client.get_run(run_id)
    assert run.data.params == {"batch_size": "0", "lr": "4e-3", "weight_decay": "0.050", "seed": "42"}
    used = {name: value for name, value in run.data.tags.items() if name.startswith(tracking.USED_PARAM_TAG_PREFIX)}
    assert used == {"cifake.used.batch_size": "128"}


def test_training_processes_take_the_launchers_splits_only_as_made_for_their_run(
    make_dataset, tmp_path: Path, monkeypatch, caplog
):
    """A process of a launched group reads the splits its launcher made instead of scanning again, but not splits
    made from other settings or another folder, nor ones that do not read back whole (before its fields were
    quoted, the CSV turned a carriage return in a file name into a line break): it scans then, and says so."""
    root = make_dataset(train=6, test=2)
    data = DataConfig(val_fraction=0.25, seed=3)
    made = launch.prepare(root, root.name, data, num_workers=0)
    folder = tmp_path / "launch"
    write_split_files(made, folder)
    monkeypatch.setenv(LAUNCH_FOLDER_VARIABLE, str(folder))
    assert launch.launcher_splits(root, data) is None  # not a process of a torchrun group
    monkeypatch.setenv("WORLD_SIZE", "2")
    pd.testing.assert_frame_equal(launch.launcher_splits(root, data).manifest, made.manifest)
    assert "do not read back" not in caplog.text
    assert launch.launcher_splits(root, dataclasses.replace(data, seed=4)) is None
    assert launch.launcher_splits(make_dataset(name="other"), data) is None
    manifest = folder / MANIFEST_FILE
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:-1]))  # the last image lost
    assert launch.launcher_splits(root, data) is None
    assert caplog.text.count("do not read back as made for this run: scanning the data") == 3


def test_a_sigterm_during_a_metrics_write_lets_it_finish_then_ends_the_run_killed(tracking_store: str):
    """Raised inside SQLAlchemy's transaction, the interrupt left it half-committed (MLflow reported an internal
    error and the run ended FAILED) or holding SQLite's write lock (the run's ending writes waited 20 s each on their
    own process, failed, and the run was left RUNNING): test_stopping_training_mid_run_ends_the_run_killed failed so,
    now and then. Here the signal arrives inside the metrics insert every time."""
    signalled = []

    def sigterm_inside_the_insert(connection, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO metrics") and not signalled:
            signalled.append(statement)
            signal.raise_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # as `cifake train` handles it
    event.listen(Engine, "before_cursor_execute", sigterm_inside_the_insert)
    try:
        with pytest.raises(KeyboardInterrupt), tracking.tracked_run("cifake", "train") as run_id:
            tracking.log_metrics({"train_loss": 0.5, "val_auc": 0.9}, step=1)
    finally:
        event.remove(Engine, "before_cursor_execute", sigterm_inside_the_insert)
        signal.signal(signal.SIGTERM, previous)
    assert signalled, "the metrics insert was not seen: this test no longer signals inside it"
    run = MlflowClient().get_run(run_id)
    assert run.data.metrics == {"train_loss": 0.5, "val_auc": 0.9}
    assert run.info.status == "KILLED" and run.data.tags[tracking.ERROR_TAG] == "interrupted (Ctrl-C or SIGTERM)"


def test_an_interrupt_raised_inside_a_write_without_held_signals_does_not_lock_the_store_for_the_runs_end(
    tracking_store: str,
):
    """Some writes hold no signals (the promotion lock, a caller's own MLflow call): an interrupt between the rows of
    a multi-row insert left SQLite's statement mid-way, holding the write lock while the exception's frames kept the
    cursor alive."""
    interrupted = []

    def interrupt_after_the_first_row(connection, cursor, statement, parameters, context, executemany):
        if not (executemany and statement.startswith("INSERT INTO metrics") and not interrupted):
            return statement, parameters

        def rows():
            interrupted.append(statement)
            yield parameters[0]
            raise KeyboardInterrupt("signal 15")

        return statement, rows()

    event.listen(Engine, "before_cursor_execute", interrupt_after_the_first_row, retval=True)
    try:
        with pytest.raises(KeyboardInterrupt), tracking.tracked_run("cifake", "train") as run_id:
            mlflow.log_metrics({"train_loss": 0.5, "val_auc": 0.9}, step=1)  # around tracking's held signals
    finally:
        event.remove(Engine, "before_cursor_execute", interrupt_after_the_first_row)
    assert interrupted, "the metrics were not written in one multi-row insert: this test no longer interrupts one"
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags[tracking.ERROR_TAG] == "interrupted (Ctrl-C or SIGTERM)"


def test_a_heartbeat_is_stamped_in_whole_seconds_never_in_the_future(monkeypatch):
    """A beat rounded up (1000.6 s as 1001) left a run killed at once not yet silent for `end_abandoned_runs(...,
    silent_for_seconds=0)`, and test_shared_server's test of a training killed outright failed now and then."""
    monkeypatch.setattr(tracking.time, "time", lambda: 1000.6)
    assert tracking._heartbeat_stamp() == "1000"


def test_a_run_its_process_left_running_is_ended_by_the_launcher_that_named_the_run_id_file(
    tracking_store: str, tmp_path: Path, monkeypatch
):
    run_id_file = tmp_path / "run_id"
    assert tracking.end_run_left_running(run_id_file, "FAILED", "killed") is None  # the process started no run
    monkeypatch.setenv(tracking.RUN_ID_FILE_VARIABLE, str(run_id_file))
    with tracking.tracked_run("cifake", "train") as ended_by_its_process:
        pass
    assert run_id_file.read_text() == ended_by_its_process
    assert tracking.end_run_left_running(run_id_file, "FAILED", "killed") is None
    client = MlflowClient()
    assert client.get_run(ended_by_its_process).info.status == "FINISHED"
    # What a process killed outright leaves: its run RUNNING.
    left_running = client.create_run(client.get_experiment_by_name("cifake").experiment_id).info.run_id
    run_id_file.write_text(left_running)
    reason = "cifake: training process 0 was killed by SIGKILL"
    assert tracking.end_run_left_running(run_id_file, "FAILED", reason) == left_running
    run = client.get_run(left_running)
    assert run.info.status == "FAILED" and run.data.tags[tracking.ERROR_TAG] == reason


def test_a_launcher_that_cannot_reach_the_tracking_store_warns_and_leaves_the_run_to_the_heartbeat_check(
    tracking_store: str, tmp_path: Path, monkeypatch, caplog
):
    client = MlflowClient()
    left_running = client.create_run(client.create_experiment("cifake")).info.run_id
    (run_id_file := tmp_path / "run_id").write_text(left_running)

    def unreachable(*args, **kwargs):
        raise MlflowException("API request failed: connection refused")

    monkeypatch.setattr(MlflowClient, "set_terminated", unreachable)
    assert tracking.end_run_left_running(run_id_file, "FAILED", "killed") is None
    assert f"could not end run {left_running}" in caplog.text and "connection refused" in caplog.text


def test_evaluating_a_missing_model_is_one_clear_line_and_starts_no_run(tracking_store: str, capsys):
    assert main(["evaluate", "--model_uri", "models:/cifake-detector/9", "--num_workers", "0"]) == 2
    assert "cannot load model models:/cifake-detector/9" in capsys.readouterr().err
    assert mlflow.get_experiment_by_name("cifake") is None


def test_a_dataset_archive_as_data_dir_says_to_unpack_it(tmp_path: Path, tracking_store: str, capsys):
    archive = tmp_path / "cifake.tar.gz"
    archive.write_bytes(b"not really an archive")
    assert main(["train", "--data_dir", str(archive)]) == 2
    assert "is a file, not a folder: unpack it first" in capsys.readouterr().err


def test_a_missing_data_dir_is_one_clear_line_and_starts_no_run(tmp_path: Path, tracking_store: str, capsys):
    assert main(["train", "--data_dir", str(tmp_path / "nowhere"), "--num_workers", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert mlflow.get_experiment_by_name("cifake") is None or not MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("cifake").experiment_id]
    )


def test_a_data_mistake_is_one_line_from_train_before_it_starts_any_training_process(
    tiny_demo: Path, tmp_path: Path, tracking_store: str, capsys
):
    few = tmp_path / "few"
    for split in ("train", "test"):
        for folder in ("FAKE", "REAL"):
            (few / split / folder).mkdir(parents=True)
            for image in sorted((tiny_demo / split / folder).iterdir())[:2]:
                (few / split / folder / image.name).write_bytes(image.read_bytes())
    flags = ["--data_dir", str(few), "--num_workers", "0", "--device", "cpu", "--processes", "2"]
    assert main(["train", *flags]) == 2
    error = capsys.readouterr().err
    assert "too few real images in train (2)" in error and "Traceback" not in error
    assert mlflow.get_experiment_by_name("cifake") is None


def test_promoting_a_missing_version_is_a_clear_error(tracking_store: str, capsys):
    assert main(["promote", "--version", "7"]) == 2
    assert "has no version '7'" in capsys.readouterr().err


def _subprocess_env(tracking_store: str) -> dict[str, str]:
    # `python` in the MLproject command must be this interpreter: child_environment puts it first on PATH
    return child_environment(MLFLOW_TRACKING_URI=tracking_store, PYTHONUNBUFFERED="1")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("processes", "stop", "status"),
    [("1", signal.SIGTERM, 130), ("2", signal.SIGTERM, 130), ("2", signal.SIGKILL, -signal.SIGKILL)],
)
def test_stopping_training_mid_run_ends_the_run_killed(
    tiny_demo: Path, tracking_store: str, processes: str, stop: signal.Signals, status: int, tmp_path: Path
):
    """SIGTERM in one process; through the process group `train` starts itself, SIGTERM and even SIGKILL of the
    launcher, whose torchrun the kernel then sends SIGTERM: no training outlives it, no run stays RUNNING, and no
    temporary folder is left behind (the launch folder is removed by torchrun's wrapper, which outlives a launcher
    killed outright)."""
    temporary = tmp_path / "temporary"
    temporary.mkdir()
    process, run_id = _train_until_validated(tracking_store, tiny_demo, processes, TMPDIR=str(temporary))
    try:
        process.send_signal(stop)
        output, _ = process.communicate(timeout=120)  # the output ends when every process writing it has ended
    finally:
        process.kill()
    assert process.returncode == status, output
    assert MlflowClient().get_run(run_id).info.status == "KILLED"
    assert not list(temporary.glob("cifake-*")), list(temporary.iterdir())


def _train_until_validated(
    tracking_store: str, data_dir: Path, processes: str, **environment: str
) -> tuple[subprocess.Popen, str]:
    """`cifake train` for 500 epochs as `processes` processes, with `environment` added to this one's, returned
    running once its first epoch is logged, and its run's id."""
    command = [sys.executable, "-m", "cifake_core.cli", "train", "--data_dir", str(data_dir), "--epochs", "500"]
    command += ["--batch_size", "16", "--num_workers", "0", "--device", "cpu", "--processes", processes]
    process = subprocess.Popen(
        command,
        env=_subprocess_env(tracking_store) | environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        experiment = mlflow.get_experiment_by_name("cifake")
        runs = MlflowClient().search_runs([experiment.experiment_id]) if experiment else []
        if runs and "val_auc" in runs[0].data.metrics:
            return process, runs[0].info.run_id
        time.sleep(1)
    process.kill()
    raise AssertionError(f"training ended or logged no epoch in 240 s: {process.communicate()[0][-3000:]}")


def _training_process(launcher_pid: int, rank: int) -> int:
    """The pid of the training process of `rank` among the descendants of the `cifake train` at `launcher_pid`."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    pending = list(children.get(launcher_pid, []))
    while pending:
        pid = pending.pop()
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0"):
                return pid
        pending += children.get(pid, [])
    raise AssertionError(f"no training process of rank {rank} under {launcher_pid}")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the training processes through /proc")
@pytest.mark.parametrize(
    ("rank", "stop", "told"),
    [
        (1, signal.SIGKILL, "training process 1 was killed by SIGKILL"),
        (0, signal.SIGTERM, "training process 0 was"),
        (0, signal.SIGKILL, "training process 0 was killed by SIGKILL"),
    ],
)
def test_a_training_process_ended_alone_is_named_in_one_line_without_its_peers_traceback(
    tiny_demo: Path, tracking_store: str, rank: int, stop: signal.Signals, told: str, tmp_path: Path
):
    """The out-of-memory killer or a stray SIGTERM ends one process of the group: its peer's collective fails on
    the lost connection. The user is told which process ended and how, not the peer's gloo traceback, and the
    run does not stay RUNNING, even when rank 0, which writes it, is the process killed outright. The work folder
    of a process killed outright is not left behind either."""
    temporary = tmp_path / "temporary"
    temporary.mkdir()
    process, run_id = _train_until_validated(tracking_store, tiny_demo, "2", TMPDIR=str(temporary))
    try:
        os.kill(_training_process(process.pid, rank), stop)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1, output
    assert told in output.splitlines()[-1] and "Traceback" not in output, output[-3000:]
    assert not list(temporary.glob("cifake-*")), list(temporary.iterdir())
    run = MlflowClient().get_run(run_id)
    if (rank, stop) == (0, signal.SIGKILL):  # the launcher ended the run, with the line the user was told
        assert run.info.status == "FAILED" and told in run.data.tags[tracking.ERROR_TAG], run.data.tags
        return
    assert run.info.status in {"FAILED", "KILLED"}
    if run.info.status == "FAILED":  # rank 0 saw its peer's end before torchrun's SIGTERM reached it
        assert "PeerEndedError: another training process" in run.data.tags[tracking.ERROR_TAG], run.data.tags


@pytest.mark.slow
def test_mlflow_run_of_the_project_trains_registers_and_promotes(tiny_demo: Path, tracking_store: str):
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(ROOT),
        "--env-manager",
        "local",
        "--experiment-name",
        "cifake",
        "-P",
        "epochs=1",
        "-P",
        f"data_dir={tiny_demo}",
        "-P",
        "batch_size=16",
        "-P",
        "num_workers=0",
    ]
    completed = subprocess.run(
        command, env=_subprocess_env(tracking_store), capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("cifake").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "1" and "val_auc" in run.data.metrics
    assert run.data.params["processes"] == "0" and int(run.data.tags["cifake.used.processes"]) >= 1  # auto
    assert _production() == "1"
