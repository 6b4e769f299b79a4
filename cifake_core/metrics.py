"""Detection metrics, decision thresholds and curves, from labels (1 = ai) and scores (prob_ai).

Thresholds are chosen on validation scores only and then reported on test. A score at or above the
threshold means `ai`. Named thresholds: `0.5`; `f1` (maximises F1); `youden` (maximises TPR - FPR); and
`fpr_1pct` (the highest recall that calls at most 1% of real images AI-generated, the costly error).

Usage:
    thresholds = choose_thresholds(val_labels, val_scores)          # {"0.5": 0.5, "f1": 0.47, ...}
    metrics = binary_metrics(test_labels, test_scores, thresholds["f1"], prefix="test")
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

MAX_FALSE_POSITIVE_RATE = 0.01
CURVE_POINTS = 200


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    predicted = scores >= threshold
    actual = labels == 1
    return {
        "tn": int(np.sum(~predicted & ~actual)),
        "fp": int(np.sum(predicted & ~actual)),
        "fn": int(np.sum(~predicted & actual)),
        "tp": int(np.sum(predicted & actual)),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float, prefix: str) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and the false-positive rate at `threshold`, plus AUC and AP; keys prefixed."""
    counts = confusion(labels, scores, threshold)
    precision = _ratio(counts["tp"], counts["tp"] + counts["fp"])
    recall = _ratio(counts["tp"], counts["tp"] + counts["fn"])
    both_classes = len(np.unique(labels)) == 2
    values = {
        "auc": float(roc_auc_score(labels, scores)) if both_classes else float("nan"),
        "average_precision": float(average_precision_score(labels, scores)) if both_classes else float("nan"),
        "accuracy": _ratio(counts["tp"] + counts["tn"], len(labels)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "fpr": _ratio(counts["fp"], counts["fp"] + counts["tn"]),
    }
    return {f"{prefix}_{name}": value for name, value in values.items()}


def choose_thresholds(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The named decision thresholds, chosen on these (validation) labels and scores."""
    # Every ROC point is kept: with tied scores the best point under the FPR bound may be an "intermediate" one.
    fpr, tpr, roc_thresholds = roc_curve(labels, scores, drop_intermediate=False)
    finite = np.isfinite(roc_thresholds)  # the first ROC threshold is +inf: "call nothing ai"
    youden = roc_thresholds[finite][np.argmax((tpr - fpr)[finite])]
    allowed = finite & (fpr <= MAX_FALSE_POSITIVE_RATE)
    # When even the top score is shared with too many real images, only "call nothing ai" keeps the bound:
    # a threshold just above the highest score (which can be exactly 1.0 in float32).
    never = float(np.nextafter(max(float(np.max(scores)), 1.0), np.inf))
    low_fpr = roc_thresholds[allowed][np.argmax(tpr[allowed])] if allowed.any() else never
    precision, recall, pr_thresholds = precision_recall_curve(labels, scores)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=(precision + recall) > 0
    )[:-1]  # the last PR point has no threshold
    best_f1 = pr_thresholds[np.argmax(f1)]
    return {"0.5": 0.5, "f1": float(best_f1), "youden": float(youden), "fpr_1pct": float(low_fpr)}


def threshold_report(
    val_labels: np.ndarray, val_scores: np.ndarray, test_labels: np.ndarray, test_scores: np.ndarray, default: str
) -> dict:
    """`thresholds.json`: each threshold chosen on val, with its figures on val and on test, and the default."""
    chosen = choose_thresholds(val_labels, val_scores)
    return {
        "default": default,
        "rule": "label is `ai` when prob_ai >= threshold",
        "chosen_on": "val",
        "thresholds": {
            name: {
                "value": value,
                "val": binary_metrics(val_labels, val_scores, value, prefix="val"),
                "test": binary_metrics(test_labels, test_scores, value, prefix="test"),
            }
            for name, value in chosen.items()
        },
    }


def _thin(*arrays: np.ndarray) -> list[list[float]]:
    keep = np.unique(np.linspace(0, len(arrays[0]) - 1, min(CURVE_POINTS, len(arrays[0]))).round().astype(int))
    return [np.round(array[keep].astype(float), 6).tolist() for array in arrays]


def curves(labels: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, list[float]]]:
    """ROC and precision-recall curves thinned to at most CURVE_POINTS points, for figures and run comparison."""
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    fpr_points, tpr_points = _thin(fpr, tpr)
    precision_points, recall_points = _thin(precision, recall)
    return {
        "roc": {"fpr": fpr_points, "tpr": tpr_points},
        "pr": {"precision": precision_points, "recall": recall_points},
    }
