"""Metrics and decision thresholds on scores whose right answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from cifake_core.metrics import binary_metrics, choose_thresholds, curves, threshold_report


def test_binary_metrics_count_each_kind_of_error():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.4, 0.7, 0.9, 0.95])
    metrics = binary_metrics(labels, scores, 0.5, prefix="test")
    # at 0.5: tp=3, fn=1 (0.4), fp=1 (0.8), tn=3
    assert metrics["test_accuracy"] == pytest.approx(6 / 8)
    assert metrics["test_precision"] == pytest.approx(3 / 4)
    assert metrics["test_recall"] == pytest.approx(3 / 4)
    assert metrics["test_f1"] == pytest.approx(3 / 4)
    assert metrics["test_fpr"] == pytest.approx(1 / 4)
    assert metrics["test_auc"] == pytest.approx(14 / 16)
    assert set(metrics) == {
        f"test_{k}" for k in ("auc", "average_precision", "accuracy", "precision", "recall", "f1", "fpr")
    }


def test_thresholds_on_separable_scores_split_the_classes():
    labels = np.array([0] * 50 + [1] * 50)
    scores = np.concatenate([np.linspace(0.0, 0.3, 50), np.linspace(0.6, 1.0, 50)])
    chosen = choose_thresholds(labels, scores)
    assert chosen["0.5"] == 0.5
    for name in ("f1", "youden", "fpr_1pct"):
        assert 0.3 < chosen[name] <= 0.6, name
        assert binary_metrics(labels, scores, chosen[name], "v")["v_f1"] == 1.0


def test_fpr_1pct_threshold_keeps_false_positives_at_or_below_one_percent():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 2000 + [1] * 2000)
    scores = np.concatenate([rng.normal(0.35, 0.12, 2000), rng.normal(0.65, 0.12, 2000)]).clip(0, 1)
    chosen = choose_thresholds(labels, scores)
    low_fpr = binary_metrics(labels, scores, chosen["fpr_1pct"], "v")
    assert low_fpr["v_fpr"] <= 0.01
    # it is the best such threshold: a little lower already breaks the 1% bound
    assert binary_metrics(labels, scores, chosen["fpr_1pct"] - 0.01, "v")["v_fpr"] > 0.01
    # the F1 threshold really maximises F1 over a grid of alternatives
    best_f1 = binary_metrics(labels, scores, chosen["f1"], "v")["v_f1"]
    assert all(binary_metrics(labels, scores, t, "v")["v_f1"] <= best_f1 + 1e-12 for t in np.linspace(0, 1, 101))


def test_threshold_report_chooses_on_val_and_reports_on_test():
    rng = np.random.default_rng(1)
    val_labels = np.array([0] * 100 + [1] * 100)
    val_scores = np.concatenate([rng.uniform(0.0, 0.4, 100), rng.uniform(0.3, 1.0, 100)])
    test_labels = np.array([0, 1])
    test_scores = np.array([0.45, 0.46])  # a test split that would pick a different threshold
    report = threshold_report(val_labels, val_scores, test_labels, test_scores, default="f1")
    assert report["default"] == "f1" and report["chosen_on"] == "val"
    assert report["thresholds"]["f1"]["value"] == choose_thresholds(val_labels, val_scores)["f1"]
    assert set(report["thresholds"]["youden"]["test"]) >= {"test_f1", "test_fpr", "test_recall"}


def test_curves_are_thinned_and_monotone():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 5000)
    scores = rng.uniform(0, 1, 5000)
    roc = curves(labels, scores)["roc"]
    assert len(roc["fpr"]) <= 200
    assert roc["fpr"][0] == 0.0 and roc["fpr"][-1] == 1.0
    assert all(b >= a for a, b in zip(roc["fpr"], roc["fpr"][1:], strict=False))


def test_fpr_1pct_calls_nothing_ai_when_real_images_share_the_top_score():
    # float32 softmax saturates: here 2 of 50 real images score exactly 1.0, like the best fakes
    labels = np.array([0] * 50 + [1] * 50)
    scores = np.concatenate([np.linspace(0.0, 0.5, 48), [1.0, 1.0], np.full(50, 1.0)])
    chosen = choose_thresholds(labels, scores)
    assert chosen["fpr_1pct"] > 1.0
    assert binary_metrics(labels, scores, chosen["fpr_1pct"], "v")["v_fpr"] == 0.0


def test_fpr_1pct_uses_every_roc_point_with_tied_scores():
    labels = np.array([0] * 200 + [1] * 200)
    scores = np.concatenate([np.repeat(np.linspace(0.0, 0.6, 100), 2), np.repeat(np.linspace(0.55, 1.0, 50), 4)])
    chosen = choose_thresholds(labels, scores)
    at_choice = binary_metrics(labels, scores, chosen["fpr_1pct"], "v")
    assert at_choice["v_fpr"] <= 0.01
    candidates = [t for t in np.unique(scores) if binary_metrics(labels, scores, t, "v")["v_fpr"] <= 0.01]
    assert at_choice["v_recall"] == max(binary_metrics(labels, scores, t, "v")["v_recall"] for t in candidates)
