"""Calibration: does prob_ai mean what it says? Expected calibration error, reliability-diagram data, and
temperature scaling fitted on validation logits.

The reliability of a binary detector is read off its own score: the test images are put in ECE_BINS
equal-width bins of prob_ai, and in each bin the mean prob_ai is compared with the share of images that
really are `ai`. ECE is the mean gap, weighted by each bin's share of images (0 = perfectly calibrated).
Temperature scaling divides the logits by one scalar T > 0 before the softmax: it leaves the ranking (AUC)
untouched and only makes the scores less (T > 1) or more (T < 1) confident. T is fitted on validation logits
by minimising the negative log-likelihood, never on test. ECE depends on its bins and is noisy for a strong
detector whose scores crowd the two end bins, so the report also gives the test NLL (log loss) before and
after: a proper score, which says whether the temperature helped on images it was not fitted on. Numpy and
scipy only: no torch here.

Usage:
    temperature = fit_temperature(val_logits, val_labels)            # logits: (N, 2), labels: 1 = ai
    report = calibration_report(test_labels, prob_ai_before, prob_ai_after, temperature)
    report["ece_before"], report["ece_after"], report["nll_before"], report["nll_after"]
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize_scalar

ECE_BINS = 15
# Wide enough for any network trained with cross-entropy; a fit on the bound means a degenerate validation set.
TEMPERATURE_BOUNDS = (0.05, 20.0)
log = logging.getLogger(__name__)


def reliability(labels: np.ndarray, prob_ai: np.ndarray, bins: int = ECE_BINS) -> dict[str, list]:
    """Per equal-width bin of prob_ai: its edges, image count, mean prob_ai and share of `ai` (None when empty)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin b holds edges[b] <= p < edges[b+1]; the last bin also holds p == 1.
    index = np.clip(np.digitize(prob_ai, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    totals = np.bincount(index, weights=prob_ai, minlength=bins)
    positives = np.bincount(index, weights=labels.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_prob, fraction_ai = totals / counts, positives / counts
    return {
        "bin_lower": edges[:-1].round(6).tolist(),
        "bin_upper": edges[1:].round(6).tolist(),
        "count": counts.tolist(),
        "mean_prob_ai": [float(v) if n else None for v, n in zip(mean_prob, counts, strict=True)],
        "fraction_ai": [float(v) if n else None for v, n in zip(fraction_ai, counts, strict=True)],
    }


def expected_calibration_error(labels: np.ndarray, prob_ai: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over bins of (share of images) x |mean prob_ai - share of ai|."""
    data = reliability(labels, prob_ai, bins)
    total = sum(data["count"])
    return float(
        sum(
            count / total * abs(mean - fraction)
            for count, mean, fraction in zip(data["count"], data["mean_prob_ai"], data["fraction_ai"], strict=True)
            if count
        )
    )


def log_loss(labels: np.ndarray, prob_ai: np.ndarray) -> float:
    """Mean -log of the probability given to each image's true class (1 = ai); 0 = certain and right."""
    # Clipped so one score of exactly 0 or 1 on the wrong side costs -log(1e-12), not infinity.
    prob = np.asarray(prob_ai, dtype=np.float64)
    prob_true = np.where(np.asarray(labels) == 1, prob, 1.0 - prob)
    return float(-np.mean(np.log(np.clip(prob_true, 1e-12, 1.0))))


def _negative_log_likelihood(margin: np.ndarray, sign: np.ndarray, temperature: float) -> float:
    # -log softmax(logits / T)[label] for two classes is log(1 + exp(-sign * margin / T)), computed stably.
    return float(np.mean(np.logaddexp(0.0, -sign * margin / temperature)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the NLL of softmax(logits / T) on these (validation) logits (N, 2) and labels."""
    logits = np.asarray(logits, dtype=np.float64)
    margin = logits[:, 1] - logits[:, 0]  # prob_ai = sigmoid(margin / T)
    sign = np.where(np.asarray(labels) == 1, 1.0, -1.0)
    low, high = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    # Searched on log T: the NLL is far better conditioned there, and T stays positive.
    found = minimize_scalar(
        lambda log_t: _negative_log_likelihood(margin, sign, float(np.exp(log_t))),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-5},
    )
    temperature = float(np.exp(found.x))
    if min(found.x - low, high - found.x) < 1e-3:
        log.warning(
            "temperature %.3g sits on its bound %s: the validation set is too small or perfectly separated to "
            "calibrate on; read prob_ai as a ranking only",
            temperature,
            TEMPERATURE_BOUNDS,
        )
    return temperature


def calibration_report(
    labels: np.ndarray, prob_before: np.ndarray, prob_after: np.ndarray, temperature: float
) -> dict[str, object]:
    """`calibration.json`: the temperature and, on these (test) images, ECE, log loss and reliability before and
    after."""
    return {
        "temperature": temperature,
        "fitted_on": "val",
        "method": "temperature scaling: prob_ai = softmax(logits / temperature)[ai], T minimising validation NLL",
        "bins": ECE_BINS,
        "images": len(labels),
        "ece_before": expected_calibration_error(labels, prob_before),
        "ece_after": expected_calibration_error(labels, prob_after),
        "nll_before": log_loss(labels, prob_before),
        "nll_after": log_loss(labels, prob_after),
        "reliability_before": reliability(labels, prob_before),
        "reliability_after": reliability(labels, prob_after),
    }
