"""Calibration: ECE and reliability data on known cases, temperature scaling that repairs a miscalibrated
detector, and the temperature carried inside the exported ONNX graph."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from cifake_core.calibration import (
    TEMPERATURE_BOUNDS,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    log_loss,
    reliability,
)
from cifake_core.engine import prob_ai
from cifake_core.models import create_model
from cifake_core.onnx_export import export_onnx
from cifake_core.onnx_runtime import INPUT_NAME, OUTPUT_NAME, onnx_session


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))


def _detector(overconfidence: float, count: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, 2) of a detector whose true log-odds are `margin` but which reports `overconfidence * margin`."""
    rng = np.random.default_rng(seed)
    margin = rng.normal(0.0, 2.0, count)
    labels = (rng.random(count) < _sigmoid(margin)).astype(np.int64)
    return np.stack([np.zeros(count), overconfidence * margin], axis=1), labels


def _prob(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return prob_ai(torch.from_numpy(logits) / temperature).numpy()


def test_ece_by_hand():
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.05, 0.15, 0.85, 0.95, 1.0])
    # Two bins: [0, 0.5) holds 0.05 and 0.15 (mean 0.1, no ai); [0.5, 1] holds the rest (mean 0.9333, all ai).
    expected = 2 / 5 * 0.1 + 3 / 5 * (1 - (0.85 + 0.95 + 1.0) / 3)
    assert expected_calibration_error(labels, scores, bins=2) == pytest.approx(expected)


def test_log_loss_by_hand_and_a_certain_wrong_score_is_finite():
    labels = np.array([1, 0, 1])
    expected = -(np.log(0.8) + np.log(0.9) + np.log(0.5)) / 3
    assert log_loss(labels, np.array([0.8, 0.1, 0.5])) == pytest.approx(expected)
    assert log_loss(np.array([1, 0]), np.array([1.0, 0.0])) == pytest.approx(0.0, abs=1e-9)
    assert log_loss(np.array([0]), np.array([1.0])) == pytest.approx(-np.log(1e-12))


def test_reliability_bins_every_image_once_and_leaves_empty_bins_empty():
    labels = np.array([0, 1, 1])
    data = reliability(labels, np.array([0.0, 0.99, 1.0]), bins=4)
    assert data["count"] == [1, 0, 0, 2]  # a score of exactly 1.0 belongs to the last bin
    assert data["mean_prob_ai"][1] is None and data["fraction_ai"][3] == 1.0
    assert data["bin_lower"] == [0.0, 0.25, 0.5, 0.75] and data["bin_upper"][-1] == 1.0


def test_a_calibrated_detector_has_a_small_ece_and_needs_no_temperature():
    logits, labels = _detector(overconfidence=1.0)
    assert expected_calibration_error(labels, _prob(logits)) < 0.02
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("overconfidence", [3.0, 0.4], ids=["overconfident", "underconfident"])
def test_temperature_scaling_finds_the_distortion_and_lowers_ece(overconfidence):
    val_logits, val_labels = _detector(overconfidence, seed=1)
    test_logits, test_labels = _detector(overconfidence, seed=2)
    temperature = fit_temperature(val_logits, val_labels)
    assert temperature == pytest.approx(overconfidence, rel=0.1)
    report = calibration_report(test_labels, _prob(test_logits), _prob(test_logits, temperature), temperature)
    assert report["ece_before"] > 0.05
    assert report["ece_after"] < 0.02
    assert report["nll_after"] < report["nll_before"] - 0.01
    assert report["temperature"] == temperature and report["images"] == len(test_labels)
    assert sum(report["reliability_after"]["count"]) == len(test_labels)


def test_perfectly_separated_validation_data_hits_the_bound_with_a_warning(caplog):
    logits = np.array([[0.0, 5.0], [0.0, 3.0], [0.0, -4.0], [0.0, -2.0]])
    with caplog.at_level(logging.WARNING, logger="cifake_core.calibration"):
        temperature = fit_temperature(logits, np.array([1, 1, 0, 0]))
    assert temperature == pytest.approx(TEMPERATURE_BOUNDS[0], rel=0.01)
    assert "sits on its bound" in caplog.text


def test_the_exported_graph_applies_the_temperature(tmp_path: Path):
    torch.manual_seed(0)
    model, _ = create_model(pretrained="false", pretrained_weights="", stem_stride=2)
    model.eval()
    with torch.no_grad():
        model.backbone.get_classifier().weight.normal_(0.0, 20.0)  # logits far from 0, so the temperature shows
    images = np.random.default_rng(0).integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    report = export_onnx(model, 32, tmp_path / "model.onnx", images, temperature=4.0)
    assert report["onnx_max_abs_diff"] < 1e-4
    served = onnx_session(tmp_path / "model.onnx").run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    with torch.no_grad():
        logits = model(torch.from_numpy(images))
    np.testing.assert_allclose(served, prob_ai(logits / 4.0).numpy(), atol=1e-5)
    assert np.abs(served - prob_ai(logits).numpy()).max() > 0.05
