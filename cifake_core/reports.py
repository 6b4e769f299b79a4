"""Report files of a training or evaluation: JSON written atomically, and the figures: ROC, PR, confusion
matrix, reliability diagram (calibration) and robustness under perturbations.

Usage:
    write_json(folder / "metrics.json", metrics)
    paths = save_figures(curves(labels, scores), confusion(labels, scores, 0.5), folder)
    save_reliability_diagram(calibration_report(...), folder / "reliability.png")
    save_robustness_figure(robustness_report(...)[1], folder / "robustness.png")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files; no display exists on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cifake_core.files import atomic_path  # noqa: E402


def write_json(path: Path, content: Any) -> Path:
    """Pretty JSON, written atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(content, indent=2, allow_nan=True) + "\n")
    return path


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def save_figures(curve_data: dict, counts: dict[str, int], folder: Path) -> list[Path]:
    """`roc.png`, `pr.png` and `confusion_matrix.png` in `folder`."""
    roc, pr = curve_data["roc"], curve_data["pr"]
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot(roc["fpr"], roc["tpr"], label="detector")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axes.set(xlabel="false-positive rate (real called ai)", ylabel="true-positive rate", title="ROC (test)")
    axes.legend(loc="lower right")
    paths = [_save(figure, folder / "roc.png")]

    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.plot(pr["recall"], pr["precision"])
    axes.set(xlabel="recall (ai)", ylabel="precision (ai)", title="Precision-recall (test)", ylim=(0, 1.02))
    paths.append(_save(figure, folder / "pr.png"))

    matrix = [[counts["tn"], counts["fp"]], [counts["fn"], counts["tp"]]]
    figure, axes = plt.subplots(figsize=(4.2, 3.8))
    axes.imshow(matrix, cmap="Blues")
    for row in range(2):
        for column in range(2):
            axes.text(column, row, f"{matrix[row][column]:,}", ha="center", va="center", fontsize=12)
    axes.set_xticks([0, 1], labels=["real", "ai"])
    axes.set_yticks([0, 1], labels=["real", "ai"])
    axes.set(xlabel="predicted", ylabel="actual", title="Confusion matrix (test)")
    paths.append(_save(figure, folder / "confusion_matrix.png"))
    return paths


def save_reliability_diagram(calibration: dict, path: Path) -> Path:
    """Share of `ai` against mean prob_ai per bin, before and after temperature scaling, from `calibration.json`."""
    figure, axes = plt.subplots(figsize=(4.8, 4.5))
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for key, label in (("before", "uncalibrated"), ("after", f"temperature {calibration['temperature']:.2f}")):
        data = calibration[f"reliability_{key}"]
        filled = [i for i, count in enumerate(data["count"]) if count]
        axes.plot(
            [data["mean_prob_ai"][i] for i in filled],
            [data["fraction_ai"][i] for i in filled],
            marker="o",
            label=f"{label} (ECE {calibration[f'ece_{key}']:.3f})",
        )
    axes.set(
        xlabel="mean prob_ai in bin",
        ylabel="share of images that are ai",
        title="Reliability (test)",
        xlim=(0, 1),
        ylim=(0, 1.02),
    )
    axes.legend(loc="upper left", fontsize=8)
    return _save(figure, path)


def save_robustness_figure(report: dict, path: Path) -> Path:
    """AUC and false-positive rate at the default threshold per perturbation, one bar per test set."""
    datasets = report["datasets"]
    variants = list(next(iter(datasets.values()))["results"])
    positions = np.arange(len(variants))
    width = 0.8 / len(datasets)
    figure, (auc_axes, fpr_axes) = plt.subplots(2, 1, figsize=(max(6.0, 0.75 * len(variants)), 6.5), sharex=True)
    for index, (name, entry) in enumerate(datasets.items()):
        offsets = positions - 0.4 + width * (index + 0.5)
        auc_axes.bar(offsets, [entry["results"][v]["auc"] for v in variants], width, label=name)
        fpr_axes.bar(offsets, [entry["results"][v]["fpr"] for v in variants], width, label=name)
    auc_axes.set(ylabel="AUC", ylim=(0, 1.02), title=f"Robustness (perturbation set {report['perturbation_set']})")
    fpr_axes.set(ylabel=f"FPR at threshold {report['threshold']:.3g}", ylim=(0, 1.02))
    fpr_axes.set_xticks(positions, labels=variants, rotation=35, ha="right")
    auc_axes.legend(title="test set", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(figure, path)
