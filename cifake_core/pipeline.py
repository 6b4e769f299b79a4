"""The cifake stages, each one tracked MLflow run: prepare data, train, evaluate, promote.

`train` reads top to bottom: splits -> arrays -> model -> epochs (best val AUC kept as a self-describing
checkpoint) -> temperature fitted on val -> thresholds on calibrated val scores -> test figures -> ONNX
export (temperature inside) -> pyfunc model -> robustness report -> registered version -> promotion.
A failure at any point ends the run FAILED (KILLED on Ctrl-C) and deletes a version it had registered.

Usage:
    result = train(load_config("experiments/default.yaml", {"epochs": "1"}))
    result.version, result.promoted
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from cifake_core import CLASS_NAMES, distributed, tracking
from cifake_core.calibration import calibration_report, expected_calibration_error, fit_temperature, log_loss
from cifake_core.config import DataConfig, RunConfig, TrainConfig
from cifake_core.data import PreparedData, array_cache_folder, load_split_arrays, write_split_files
from cifake_core.engine import (
    batch_starts,
    batched_logits,
    evaluate,
    keep_freed_memory_for_reuse,
    logit_metrics,
    one_cycle_optimizer,
    prob_ai,
    select_hard_examples,
    selected_count,
    sharded_logits,
    to_device_tensors,
    train_one_epoch,
    training_memory_format,
)
from cifake_core.launch import check_memory, launch_folder, launcher_splits, prepare, resolve_dataset
from cifake_core.metrics import binary_metrics, confusion, curves, threshold_report
from cifake_core.models import (
    TIMM_STEM_STRIDE,
    create_model,
    fold_batchnorm,
    save_checkpoint,
    set_stem_stride,
    single_view,
)
from cifake_core.onnx_export import export_onnx
from cifake_core.predict import load_scorer
from cifake_core.pyfunc_model import INPUT_COLUMN
from cifake_core.reports import save_figures, save_reliability_diagram, save_robustness_figure, write_json
from cifake_core.robustness import TEST_SET, Scorer, labelled_images, robustness_report

ONNX_CHECK_IMAGES = 32
# On a CPU small batches keep the stride-1 network's activations in cache: the flip-averaged model scores
# 1.9x the images/s at batch 32 as at 512 on one thread, 1.3x on two (bench/evaluation.py). GPUs keep 512.
CPU_EVAL_BATCH_SIZE = 32
GPU_EVAL_BATCH_SIZE = 512
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingResult:
    run_id: str
    version: str
    promoted: bool
    promotion_reason: str
    metrics: dict[str, float]


def _log_prepared(prepared: PreparedData, folder: Path, context: str) -> None:
    for path in write_split_files(prepared, folder):
        tracking.log_artifact(path, "data")
    tracking.log_dataset(
        prepared.manifest, str(prepared.root), prepared.summary["dataset"], prepared.fingerprint, context=context
    )
    tracking.set_tags(
        {"cifake.dataset": prepared.summary["dataset"], "cifake.dataset_fingerprint": prepared.fingerprint}
    )


def prepare_data(config: RunConfig, output_dir: Path) -> PreparedData:
    """The `prepare_data` stage: splits written to output_dir and logged to a run."""
    root, name = resolve_dataset(config.data.data_dir)
    with tracking.tracked_run(config.publish.experiment_name, "prepare_data", {"cifake.stage": "prepare_data"}):
        tracking.log_params(
            {field: value for field, value in config.flat().items() if field in DataConfig.__annotations__}
        )
        prepared = prepare(root, name, config.data, config.train.num_workers)
        _log_prepared(prepared, output_dir, context="training")
    return prepared


def promotion_decision(mode: str, val_auc: float, fingerprint: str, production: dict | None) -> tuple[bool, str]:
    """Whether a new version takes the `production` alias, and why; pure, so the rule is testable alone."""
    if mode == "never":
        return False, "promote=never"
    if mode == "always":
        return True, "promote=always"
    if production is None:
        return True, "no production model yet"
    current = production["version"]
    production_fingerprint = production["tags"].get("dataset_fingerprint")
    if production_fingerprint != fingerprint:
        return False, (
            f"production v{current} was validated on dataset {production_fingerprint}, this run on {fingerprint}: "
            f"their val AUCs are not comparable (promote by hand with `cifake promote --version N`)"
        )
    try:
        production_auc = float(production["tags"]["val_auc"])
    except (KeyError, ValueError):
        return False, f"production v{current} has no numeric val_auc tag to compare with: promote by hand"
    if val_auc > production_auc:
        return True, f"val AUC {val_auc:.4f} beats production v{current} ({production_auc:.4f}) on the same dataset"
    return False, f"val AUC {val_auc:.4f} does not beat production v{current} ({production_auc:.4f})"


def _png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def eval_batch_size(device: torch.device) -> int:
    return CPU_EVAL_BATCH_SIZE if device.type == "cpu" else GPU_EVAL_BATCH_SIZE


def coarse_epoch_count(epochs: int, fine_epochs: int, stem_stride: int) -> int:
    """How many of the first epochs train at a stride-2 stem: those before the last `fine_epochs` (which train at
    `stem_stride`, the stride the model is exported at and its kept epoch picked at); none when `fine_epochs` is 0,
    covers every epoch, or `stem_stride` is already 2."""
    return max(epochs - fine_epochs, 0) if stem_stride == 1 and fine_epochs > 0 else 0


def _train_epochs(
    model: torch.nn.Module,
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    train: TrainConfig,
    stem_stride: int,
    seed: int,
    checkpoint: Path,
    checkpoint_config: dict[str, Any],
) -> dict[str, float]:
    """The epoch loop, in every process; keeps the best epoch at `stem_stride` by val AUC in `checkpoint` (written
    by rank 0) and returns its metrics, with `model` holding its weights in every process. Epochs are judged on
    one view of each image (`single_view`), whatever `flip_tta`: half the validation cost. The first
    `coarse_epoch_count(...)` epochs train with a stride-2 stem and are not validated. With `train.select_fraction` < 1,
    every epoch after the first trains on that share of the images, drawn by the losses they last trained with."""
    model = model.to(memory_format=training_memory_format(device, train.batch_size))
    parallel_model = distributed.wrap(model, device)
    count = len(splits["train"][0])
    selected = selected_count(count, train.select_fraction)
    first_steps, later_steps = (
        len(batch_starts(len(distributed.epoch_sampler(n, seed)), train.batch_size)) for n in (count, selected)
    )
    total_steps = first_steps + (train.epochs - 1) * later_steps
    optimizer, scheduler = one_cycle_optimizer(
        parallel_model, train.optimizer, train.lr, train.weight_decay, total_steps
    )
    # Each process draws its own flips and augmentations; all draw the same selection of hard examples.
    generator = torch.Generator().manual_seed(seed + distributed.rank())
    selection_generator = torch.Generator().manual_seed(seed)
    last_losses = torch.zeros(count)
    coarse_epochs = coarse_epoch_count(train.epochs, train.fine_epochs, stem_stride)
    best: dict[str, float] = {"val_auc": -1.0}
    for epoch in range(1, train.epochs + 1):
        pool = torch.arange(count)
        if epoch > 1 and selected < count:
            pool = select_hard_examples(last_losses, train.select_fraction, selection_generator)
        sampler = distributed.epoch_sampler(len(pool), seed)
        sampler.set_epoch(epoch)
        order = pool[list(sampler)]
        epoch_losses = torch.zeros(count, device=device)
        coarse = epoch <= coarse_epochs
        # The stride changes no weight's shape, so the coarse epochs' weights carry on at the fine stride.
        set_stem_stride(model.backbone, TIMM_STEM_STRIDE if coarse else stem_stride)
        metrics = train_one_epoch(
            parallel_model,
            *splits["train"],
            order,
            optimizer,
            scheduler,
            train.batch_size,
            device,
            generator,
            description=f"epoch {epoch}/{train.epochs}",
            translate=train.translate,
            augment=train.augment == "true",
            label_smoothing=train.label_smoothing,
            grad_clip_norm=train.grad_clip_norm,
            sample_losses=epoch_losses,
        )
        trained = torch.zeros(count)
        trained[order[: len(batch_starts(len(order), train.batch_size)) * train.batch_size]] = 1.0
        epoch_losses, trained = distributed.all_reduce_sum(torch.stack([epoch_losses.cpu(), trained]))
        last_losses = torch.where(trained > 0, epoch_losses, last_losses)
        distributed.sync_buffers(model)
        # Validation picks the kept epoch, and a coarse epoch is never kept (the model is exported, and was
        # configured, at `stem_stride`): the default CPU run skips 12 validations of 4.5 s. Both views made
        # validation a tenth of that run (11.1 s an epoch, 6.3 s with one); the kept model is scored with both after
        # training (`best_val_auc`), so its figures are the exported model's.
        if not coarse:
            with single_view(model):
                metrics |= evaluate(model, *splits["val"], eval_batch_size(device), device, prefix="val")
        tracking.log_metrics(metrics, step=epoch)
        validation = (
            f"  (stem stride {TIMM_STEM_STRIDE}: not validated)"
            if coarse
            else "  val_loss {val_loss:.4f}  val_auc {val_auc:.4f}  val_f1 {val_f1:.4f}".format(**metrics)
        )
        log.info(
            "epoch %d/%d  train_loss %.4f%s  %.0f img/s  %.0f s",
            epoch,
            train.epochs,
            metrics["train_loss"],
            validation,
            metrics["images_per_second"],
            metrics["epoch_seconds"],
        )
        if not coarse and metrics["val_auc"] > best["val_auc"]:
            best = {**metrics, "epoch": float(epoch)}
            best_weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
            if distributed.is_main_process():
                save_checkpoint(checkpoint, model, checkpoint_config, epoch, metrics)
    model.load_state_dict(best_weights)
    return best


def _logits(
    model: torch.nn.Module, split: tuple[torch.Tensor, torch.Tensor], device: torch.device
) -> tuple[np.ndarray, torch.Tensor]:
    """A split's labels and its logits, scored by every process, each its shard."""
    images, labels = split
    return labels.cpu().numpy(), sharded_logits(model, images, eval_batch_size(device), device)


def _calibrate(
    work: Path, val: tuple[np.ndarray, torch.Tensor], test: tuple[np.ndarray, torch.Tensor]
) -> tuple[float, np.ndarray, np.ndarray]:
    """The temperature fitted on val logits, and calibrated val and test prob_ai; logs the temperature, test ECE
    before and after, `calibration.json` and the reliability diagram."""
    (val_labels, val_logits), (test_labels, test_logits) = val, test
    temperature = fit_temperature(val_logits.numpy(), val_labels)
    val_scores = prob_ai(val_logits / temperature).numpy()
    test_scores = prob_ai(test_logits / temperature).numpy()
    report = calibration_report(test_labels, prob_ai(test_logits).numpy(), test_scores, temperature)
    tracking.log_metrics(
        {
            "temperature": temperature,
            "test_ece_uncalibrated": report["ece_before"],
            "test_ece": report["ece_after"],
            "test_nll_uncalibrated": report["nll_before"],
            "test_nll": report["nll_after"],
        }
    )
    for path in [
        write_json(work / "calibration.json", report),
        save_reliability_diagram(report, work / "reliability.png"),
    ]:
        tracking.log_artifact(path, "reports")
    log.info(
        "temperature %.3f: test ECE %.4f -> %.4f, test NLL %.4f -> %.4f",
        temperature,
        report["ece_before"],
        report["ece_after"],
        report["nll_before"],
        report["nll_after"],
    )
    return temperature, val_scores, test_scores


def _log_test_reports(
    work: Path, labels: np.ndarray, scores: np.ndarray, threshold: float, details: dict[str, Any]
) -> dict[str, float]:
    """Test metrics at `threshold`, logged, plus metrics.json, curves.json and the figures as `reports/`."""
    metrics = binary_metrics(labels, scores, threshold, prefix="test")
    tracking.log_metrics(metrics)
    counts = confusion(labels, scores, threshold)
    curve_data = curves(labels, scores)
    report = {**metrics, "threshold": threshold, "confusion_matrix": counts, "test_images": len(labels), **details}
    for path in [
        write_json(work / "metrics.json", report),
        write_json(work / "curves.json", curve_data),
        *save_figures(curve_data, counts, work),
    ]:
        tracking.log_artifact(path, "reports")
    return metrics


def _test_files(prepared: PreparedData) -> tuple[list[Path], np.ndarray]:
    rows = prepared.manifest[prepared.manifest.split == "test"]
    return [prepared.root / path for path in rows.path], (rows.label.to_numpy() == CLASS_NAMES[1]).astype(np.int64)


def _log_robustness(
    work: Path,
    prepared: PreparedData,
    eval_folders: dict[str, Path],
    score: Scorer,
    image_size: int,
    threshold_name: str,
    threshold: float,
    num_workers: int,
) -> dict[str, float]:
    """The robustness report on the test split and on each `eval_dirs` set at the default threshold: its metrics,
    `robustness.json` and `robustness.png`."""
    datasets = {TEST_SET: _test_files(prepared)} | {name: labelled_images(path) for name, path in eval_folders.items()}
    metrics, report = robustness_report(datasets, score, image_size, threshold, num_workers)
    tracking.log_metrics(metrics)
    report = {**report, "threshold_name": threshold_name, "dataset_fingerprint": prepared.fingerprint}
    for path in [write_json(work / "robustness.json", report), save_robustness_figure(report, work / "robustness.png")]:
        tracking.log_artifact(path, "reports")
    return metrics


def _robustness_scorer(model_uri: str, model: torch.nn.Module, temperature: float, device: torch.device) -> Scorer:
    """prob_ai of a uint8 batch as the registered model will give it."""
    if device.type == "cpu":
        # The logged pyfunc model itself: onnxruntime runs this network about 3x faster than eager PyTorch on a CPU.
        return load_scorer(model_uri).score_arrays
    # The report scores in chunks with these same weights: folded once, not at every chunk as predict_logits would.
    folded = fold_batchnorm(model.to(device))
    return lambda images: prob_ai(
        batched_logits(folded, torch.from_numpy(images), eval_batch_size(device), device) / temperature
    ).numpy()


def _register_and_promote(
    name: str, promote_mode: str, run_id: str, model_uri: str, tags: dict[str, Any]
) -> tuple[str, bool, str]:
    """Register a version and apply the promotion rule. Reading `production`, deciding and moving the alias
    happen under the registry's promotion lock, so concurrent runs promote one after the other, each judged
    against the production of that moment: the alias ends on the best of them. On any failure, even
    Ctrl-C, an alias this run moved is put back and the versions it registered are deleted."""
    version, production, promote = "", None, False
    try:
        version = tracking.register_model(model_uri, name, tags)
        with tracking.promotion_lock(name):
            production = tracking.alias_version(name)
            promote, reason = promotion_decision(promote_mode, tags["val_auc"], tags["dataset_fingerprint"], production)
            if promote:
                tracking.set_alias(name, version)
        tracking.set_tags(
            {"cifake.registered_version": version, "cifake.promoted": promote, "cifake.promotion_reason": reason}
        )
    except BaseException:
        current = tracking.alias_version(name) if promote else None
        if production is not None and current is not None and current["version"] == version:
            tracking.set_alias(name, production["version"])
        tracking.delete_run_versions(name, run_id)
        raise
    return version, promote, reason


def train(config: RunConfig) -> TrainingResult | None:
    """The `main` stage: train, evaluate, export, log, register and maybe promote; one MLflow run.

    Under torchrun every process trains its share of each epoch and scores its shard of val, and at the end
    its shard of val and test with the best weights; rank 0 alone logs to MLflow, calibrates, exports,
    registers and promotes while the others wait at a barrier.
    Returns the result on rank 0 and None on the other ranks."""
    with distributed.process_group(distributed.resolve_device(config.train.device)) as device:
        return _train(config, device)


def _train(config: RunConfig, device: torch.device) -> TrainingResult | None:
    # Logged, checkpointed and trained with the batch size this device gets and the processes that train, never
    # the `0`s that chose them.
    train_config = dataclasses.replace(config.train.for_device(device.type), processes=distributed.world_size())
    config = dataclasses.replace(config, train=train_config)
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    with distributed.local_main_first():  # the demo data is generated once per node
        root, name = resolve_dataset(config.data.data_dir)
    torch.manual_seed(config.data.seed)
    with (
        tracking.tracked_run(config.publish.experiment_name, "train", {"cifake.stage": "train"}) as run_id,
        tempfile.TemporaryDirectory(prefix="cifake-", dir=launch_folder()) as work_dir,
        distributed.peer_loss_named(),
    ):
        work = Path(work_dir)
        tracking.log_params(config.flat())
        (work / "config.yaml").write_text(yaml.safe_dump(config.flat(), sort_keys=False))
        tracking.log_artifact(work / "config.yaml")

        # The launcher's splits; else (a torchrun started by hand) one process per node scans the files and the
        # others read its scan cache.
        with distributed.local_main_first():
            prepared = launcher_splits(root, config.data) or prepare(root, name, config.data, config.train.num_workers)
        _log_prepared(prepared, work, context="training")
        check_memory(len(prepared.manifest), config.model.image_size)
        started = time.perf_counter()
        with distributed.local_main_first():  # one process per node decodes and caches, the others map the cache
            arrays = {
                split: load_split_arrays(
                    prepared, split, config.model.image_size, config.train.num_workers, array_cache_folder()
                )
                for split in ("train", "val", "test")
            }
        tracking.log_metrics({"decode_seconds": time.perf_counter() - started})
        splits = {split: to_device_tensors(*pair, device) for split, pair in arrays.items()}

        model, weights_source = create_model(
            config.model.pretrained,
            config.model.pretrained_weights,
            config.model.stem_stride,
            flip_tta=config.model.flip_tta == "true",
        )
        tracking.set_tags({"cifake.weights_source": weights_source, "cifake.device": str(device)})
        checkpoint = work / "best.pt"
        best = _train_epochs(
            model.to(device),
            splits,
            device,
            config.train,
            config.model.stem_stride,
            config.data.seed,
            checkpoint,
            config.flat(),
        )
        val_labels, val_logits = _logits(model, splits["val"], device)
        test_labels, test_logits = _logits(model, splits["test"], device)
        if not distributed.is_main_process():
            return None
        # The kept model's val AUC as exported, with its mirror view when flip_tta is on.
        best_val_auc = logit_metrics(val_logits, splits["val"][1], "val")["val_auc"]
        tracking.log_metrics({"best_epoch": best["epoch"], "best_val_auc": best_val_auc})
        log.info(
            "kept epoch %d: val AUC %.4f as exported (one view: %.4f)", best["epoch"], best_val_auc, best["val_auc"]
        )
        temperature, val_scores, test_scores = _calibrate(work, (val_labels, val_logits), (test_labels, test_logits))
        default = config.publish.default_threshold
        thresholds = threshold_report(val_labels, val_scores, test_labels, test_scores, default)
        tracking.log_artifact(write_json(work / "thresholds.json", thresholds), "reports")
        threshold = thresholds["thresholds"][default]["value"]
        test_metrics = _log_test_reports(
            work,
            test_labels,
            test_scores,
            threshold,
            {
                "threshold_name": default,
                "best_epoch": int(best["epoch"]),
                "best_val_auc": best_val_auc,
                "temperature": temperature,
                "dataset_fingerprint": prepared.fingerprint,
            },
        )

        onnx_path = work / "model.onnx"
        check_batch = arrays["test"][0][:ONNX_CHECK_IMAGES]
        tracking.log_metrics(export_onnx(model.cpu(), config.model.image_size, onnx_path, check_batch, temperature))
        tracking.log_artifact(onnx_path, "onnx")
        tracking.log_artifact(checkpoint, "checkpoint")
        example = pd.DataFrame({INPUT_COLUMN: [_png_base64(image) for image in check_batch[:2]]})
        model_uri = tracking.log_pyfunc_model(onnx_path, work / "thresholds.json", example)
        robust_metrics = _log_robustness(
            work,
            prepared,
            config.evaluation.folders,
            _robustness_scorer(model_uri, model, temperature, device),
            config.model.image_size,
            default,
            threshold,
            config.train.num_workers,
        )

        tags = {
            "val_auc": best_val_auc,
            "test_auc": test_metrics["test_auc"],
            "temperature": temperature,
            "dataset_fingerprint": prepared.fingerprint,
            "dataset": prepared.summary["dataset"],
            "image_size": config.model.image_size,
            "weights_source": weights_source,
            "run_id": run_id,
        }
        version, promoted, reason = _register_and_promote(
            config.publish.registered_model_name, config.publish.promote, run_id, model_uri, tags
        )
        log.info(
            "registered %s v%s; %s: %s",
            config.publish.registered_model_name,
            version,
            "promoted to production" if promoted else "not promoted",
            reason,
        )
    summary = {**test_metrics, "best_val_auc": best_val_auc, "temperature": temperature, **robust_metrics}
    return TrainingResult(run_id, version, promoted, reason, summary)


def evaluate_model(model_uri: str, config: RunConfig) -> dict[str, float]:
    """The `evaluate` stage: a registered version or run's model scored on a dataset folder's test split, with
    its calibration (ECE) and the robustness report there and on each `eval_dirs` set."""
    scorer = load_scorer(model_uri)  # a wrong URI is answered before any data is scanned or run opened
    root, name = resolve_dataset(config.data.data_dir)
    stage_tags = {"cifake.stage": "evaluate", "cifake.model_uri": model_uri}
    with (
        tracking.tracked_run(config.publish.experiment_name, "evaluate", stage_tags),
        tempfile.TemporaryDirectory(prefix="cifake-") as work_dir,
    ):
        prepared = prepare(root, name, config.data, config.train.num_workers)
        _log_prepared(prepared, Path(work_dir), context="evaluation")
        images, labels = load_split_arrays(
            prepared, "test", scorer.image_size, config.train.num_workers, array_cache_folder()
        )
        scores = scorer.score_arrays(images)
        threshold = scorer.resolve_threshold("default")
        details = {
            "model_uri": model_uri,
            "model_version": scorer.model_version,
            "threshold_name": scorer.default_threshold,
            "dataset_fingerprint": prepared.fingerprint,
        }
        metrics = _log_test_reports(Path(work_dir), labels, scores, threshold, details)
        calibration = {"test_ece": expected_calibration_error(labels, scores), "test_nll": log_loss(labels, scores)}
        tracking.log_metrics(calibration)
        metrics |= calibration
        return metrics | _log_robustness(
            Path(work_dir),
            prepared,
            config.evaluation.folders,
            scorer.score_arrays,
            scorer.image_size,
            scorer.default_threshold,
            threshold,
            config.train.num_workers,
        )


def promote(registered_model_name: str, version: str, experiment_name: str) -> str | None:
    """The `promote` stage: point `production` at `version` (a promotion or a rollback); returns the previous one."""
    tracking.configure_tracking()
    tracking.version_info(registered_model_name, version)  # a missing version is refused before a run opens
    with tracking.tracked_run(experiment_name, "promote", {"cifake.stage": "promote"}):
        previous = tracking.alias_version(registered_model_name)
        tracking.set_alias(registered_model_name, version)
        previous_version = previous["version"] if previous else None
        tracking.set_tags({"cifake.promoted_version": version, "cifake.previous_version": previous_version or "-"})
        log.info(
            "%s@%s: v%s -> v%s", registered_model_name, tracking.PRODUCTION_ALIAS, previous_version or "-", version
        )
    return previous_version
