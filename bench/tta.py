"""Test-time augmentation: a trained model's AUC on its validation and test splits when each image's logits are
averaged over views of it: its mirror image (the `flip_tta` config field) and shifts by a pixel or two.

Loads a checkpoint written by the training stage (`checkpoint/best.pt` in a run's artifacts), rebuilds the
very splits it was trained with from the config it carries (same seed, caps and validation share), and scores
every view of each split once with the model's own averaging off: the image shifted by (dy, dx) pixels, the
uncovered border reflected exactly as training's `translate` fills it, as is and mirrored. Each set of views is
then the mean of its views' logits: `plain` (the image alone), `flip` (the image and its mirror, what
`flip_tta=true` computes), and for each radius r up to `--max_shift` `shift<r>`, the shifts with |dy| + |dx| <= r
(5 positions at r = 1, 13 at r = 2), each with its mirror. The validation figures decide; the test figures judge;
the views count is the cost in predictions.

Usage:
    .venv/bin/python bench/tta.py --checkpoint best.pt --data_dir /tmp/cifake --max_shift 1 --output tta.json
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
from cifake_core.distributed import resolve_device  # noqa: E402
from cifake_core.engine import predict_logits, prob_ai, training_memory_format, translate  # noqa: E402
from cifake_core.launch import prepare, resolve_dataset  # noqa: E402
from cifake_core.metrics import binary_metrics  # noqa: E402
from cifake_core.models import ImageClassifier, load_checkpoint, single_view  # noqa: E402
from cifake_core.pipeline import eval_batch_size  # noqa: E402

View = tuple[int, int, bool]  # (dy, dx, mirrored)


def shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Each image moved so that pixel (i, j) shows the original's (i + dy, j + dx): `engine.random_translate`'s
    shift, reflected border included, fixed for every image."""
    return translate(images, torch.tensor([dy, dx]).expand(len(images), 2))


def view_sets(max_shift: int) -> dict[str, list[View]]:
    """The named sets of views, each a list of (dy, dx, mirrored)."""
    grid = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    sets = {"plain": [(0, 0, False)]}
    for radius in range(max_shift + 1):
        shifts = [(dy, dx) for dy, dx in grid if abs(dy) + abs(dx) <= radius]
        sets["flip" if radius == 0 else f"shift{radius}"] = [
            (dy, dx, mirrored) for dy, dx in shifts for mirrored in (False, True)
        ]
    return sets


def split_figures(
    model: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, device: torch.device, max_shift: int
) -> dict[str, dict[str, float]]:
    """AUC and F1 at 0.5 of one split for each set of views, and the seconds one view's scoring took; the model's
    own `flip_tta` setting is restored afterwards."""
    sets = view_sets(max_shift)
    logits: dict[View, torch.Tensor] = {}
    started = time.perf_counter()
    with single_view(model):
        for dy, dx, mirrored in sorted({view for views in sets.values() for view in views}):
            view = shifted(images, dy, dx)
            view = view.flip(-1) if mirrored else view
            logits[(dy, dx, mirrored)] = predict_logits(model, view, eval_batch_size(device), device)
    seconds_per_view = (time.perf_counter() - started) / len(logits)
    figures = {}
    for name, views in sets.items():
        mean_logits = torch.stack([logits[view] for view in views]).mean(0)
        metrics = binary_metrics(labels.numpy(), prob_ai(mean_logits).numpy(), 0.5, "tta")
        figures[name] = {"views": len(views), "auc": metrics["tta_auc"], "f1": metrics["tta_f1"]}
    return {"seconds_per_view": seconds_per_view, "sets": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoint/best.pt")
    parser.add_argument("--data_dir", required=True, help="the dataset the run trained on (CIFAKE layout)")
    parser.add_argument("--max_shift", type=int, default=1, help="largest shift in pixels; 0: mirrors only")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default="", help="write the figures to this JSON file")
    arguments = parser.parse_args()

    device = resolve_device(arguments.device)
    model, metadata = load_checkpoint(Path(arguments.checkpoint), device)
    model = model.to(memory_format=training_memory_format(device, eval_batch_size(device)))  # as the run scores
    config = metadata["config"]
    data = DataConfig(**{name: config[name] for name in DataConfig.__dataclass_fields__ if name != "data_dir"})
    root, name = resolve_dataset(arguments.data_dir)
    prepared = prepare(root, name, data, num_workers=-1)
    results = {"checkpoint_epoch": metadata["epoch"], "device": str(device)}
    for split in ("val", "test"):
        images, labels = load_split_arrays(prepared, split, config["image_size"], -1, array_cache_folder())
        figures = split_figures(model, torch.from_numpy(images), torch.from_numpy(labels), device, arguments.max_shift)
        results[split] = figures
        print(f"[bench] {split}: {len(labels)} images, {figures['seconds_per_view']:.1f} s a view", flush=True)
        for set_name, set_figures in figures["sets"].items():
            print(
                f"[bench]   {set_name:8} {set_figures['views']:2} views  AUC {set_figures['auc']:.5f}  "
                f"F1 {set_figures['f1']:.4f}",
                flush=True,
            )
    if arguments.output:
        Path(arguments.output).write_text(json.dumps({"arguments": vars(arguments), **results}, indent=2))


if __name__ == "__main__":
    main()
