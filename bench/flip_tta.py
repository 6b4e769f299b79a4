"""Flip test-time augmentation: a trained model's AUC on its validation and test splits, as is and with each
image's logits averaged with those of its mirror image.

Loads a checkpoint written by the training stage (`checkpoint/best.pt` in a run's artifacts), rebuilds the
very splits it was trained with from the config it carries (same seed, caps and validation share), and scores
each split twice with the model's own switch (`ImageClassifier.flip_tta`, the `flip_tta` config field): off,
and on, averaging the logits of each image and its left-right mirror (training flips images at random, so the
model has learnt both). The validation figures decide; the test figures judge; seconds show the cost.

Usage:
    .venv/bin/python bench/flip_tta.py --checkpoint best.pt --data_dir /tmp/cifake --output flip_tta.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cifake_core.config import DataConfig  # noqa: E402
from cifake_core.data import array_cache_folder, load_split_arrays  # noqa: E402
from cifake_core.engine import predict_logits, prob_ai, resolve_device  # noqa: E402
from cifake_core.metrics import binary_metrics  # noqa: E402
from cifake_core.models import ImageClassifier, load_checkpoint  # noqa: E402
from cifake_core.pipeline import prepare, resolve_dataset  # noqa: E402

BATCH_SIZE = 512


def split_figures(model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> dict:
    """AUC, F1 at 0.5 and seconds of one split, scored by `model` with its `flip_tta` off (`plain`) and on (`flip`);
    the model's own setting is restored afterwards."""
    figures, own_setting = {}, model.flip_tta
    for name, flip_tta in (("plain", False), ("flip", True)):
        model.flip_tta = flip_tta
        started = time.perf_counter()
        logits = predict_logits(model, images, BATCH_SIZE, device)
        figures[f"{name}_seconds"] = time.perf_counter() - started
        metrics = binary_metrics(labels.numpy(), prob_ai(logits).numpy(), 0.5, name)
        figures |= {f"{name}_auc": metrics[f"{name}_auc"], f"{name}_f1": metrics[f"{name}_f1"]}
    model.flip_tta = own_setting
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoint/best.pt")
    parser.add_argument("--data_dir", required=True, help="the dataset the run trained on (CIFAKE layout)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default="", help="write the figures to this JSON file")
    arguments = parser.parse_args()

    device = resolve_device(arguments.device)
    model, metadata = load_checkpoint(Path(arguments.checkpoint), device)
    config = metadata["config"]
    data = DataConfig(**{name: config[name] for name in DataConfig.__dataclass_fields__ if name != "data_dir"})
    root, name = resolve_dataset(arguments.data_dir)
    prepared = prepare(root, name, data, num_workers=-1)
    results = {"checkpoint_epoch": metadata["epoch"], "device": str(device)}
    for split in ("val", "test"):
        images, labels = load_split_arrays(prepared, split, config["image_size"], -1, array_cache_folder())
        figures = split_figures(model, torch.from_numpy(images), torch.from_numpy(labels), device)
        results[split] = figures
        print(
            f"[bench] {split}: {len(labels)} images, AUC {figures['plain_auc']:.4f} plain, "
            f"{figures['flip_auc']:.4f} with flips; F1 {figures['plain_f1']:.4f} -> {figures['flip_f1']:.4f}; "
            f"{figures['plain_seconds']:.1f} s -> {figures['flip_seconds']:.1f} s",
            flush=True,
        )
    if arguments.output:
        Path(arguments.output).write_text(json.dumps({"arguments": vars(arguments), **results}, indent=2))


if __name__ == "__main__":
    main()
