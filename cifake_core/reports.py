"""Report files of a training or evaluation: JSON written atomically, and ROC, PR and confusion-matrix figures.

Usage:
    write_json(folder / "metrics.json", metrics)
    paths = save_figures(curves(labels, scores), confusion(labels, scores, 0.5), folder)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # figures are files; no display exists on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

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
