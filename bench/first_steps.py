"""First-steps benchmark: loss, logit size and gradient norm over the first training steps, per head init.

Trains the detector (random weights, the default recipe: its `optimizer`, one-cycle at `lr`, clipping at
`grad_clip_norm`, batch 128, random flips) on real images decoded by the pipeline, and prints every
`--every` steps the loss, the mean |logit|, the gradient norm before clipping and the learning rate, for
two classifier initialisations: `ours` (`models.create_model`) and `timm` (timm's rule for MobileNetV3's
classifier, uniform +-1/sqrt(classes), re-drawn on the same network). Chance is a loss of ln 2 = 0.693.

Usage:
    .venv/bin/python bench/first_steps.py --data_dir /tmp/cifake --max_train_per_class 5000 --steps 60 \\
        --output first_steps.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cifake_core.config import BATCH_SIZE, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from cifake_core.data import array_cache_folder, load_split_arrays  # noqa: E402
from cifake_core.engine import one_cycle_optimizer, random_flip  # noqa: E402
from cifake_core.launch import prepare, resolve_dataset  # noqa: E402
from cifake_core.models import create_model  # noqa: E402


def _timm_head(model: torch.nn.Module) -> None:
    head = model.backbone.get_classifier()
    bound = 1.0 / math.sqrt(head.out_features)
    with torch.no_grad():
        head.weight.uniform_(-bound, bound)
        head.bias.zero_()


def first_steps(
    head: str, images: torch.Tensor, labels: torch.Tensor, train: TrainConfig, steps: int, every: int, seed: int
) -> list[dict[str, float]]:
    """The logged steps of one run from the same seed: step, lr, loss, mean |logit|, gradient norm."""
    torch.manual_seed(seed)
    model, _ = create_model(pretrained="false", pretrained_weights="", stem_stride=ModelConfig.stem_stride)
    if head == "timm":
        _timm_head(model)
    model = model.to(memory_format=torch.channels_last).train()
    steps_per_epoch = len(images) // BATCH_SIZE
    optimizer, scheduler = one_cycle_optimizer(
        model, train.optimizer, train.lr, train.weight_decay, train.epochs * steps_per_epoch
    )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    rows = []
    for step in range(min(steps, steps_per_epoch)):
        index = order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE]
        batch = random_flip(images[index], generator)
        logits = model(batch.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gradient_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip_norm or math.inf)
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        if step % every == 0:
            row = {
                "step": step,
                "lr": learning_rate,
                "loss": loss.item(),
                "mean_abs_logit": logits.abs().mean().item(),
                "gradient_norm": gradient_norm.item(),
            }
            rows.append(row)
            print(
                f"[bench] {head:4s} step {step:4d}  lr {learning_rate:.5f}  loss {row['loss']:.3f}  "
                f"|logit| {row['mean_abs_logit']:.2f}  gradient norm {row['gradient_norm']:.1f}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="dataset root in the CIFAKE layout")
    parser.add_argument("--max_train_per_class", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3, help="length of the one-cycle schedule, in epochs")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=DataConfig.seed)
    parser.add_argument("--output", default="", help="write the figures to this JSON file")
    arguments = parser.parse_args()

    root, name = resolve_dataset(arguments.data_dir)
    data = DataConfig(max_train_per_class=arguments.max_train_per_class, seed=arguments.seed)
    prepared = prepare(root, name, data, num_workers=-1)
    images, labels = load_split_arrays(prepared, "train", ModelConfig.image_size, -1, array_cache_folder())
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    train = TrainConfig(epochs=arguments.epochs)
    results = {
        head: first_steps(head, images, labels, train, arguments.steps, arguments.every, arguments.seed)
        for head in ("timm", "ours")
    }
    if arguments.output:
        Path(arguments.output).write_text(json.dumps({"arguments": vars(arguments), "steps": results}, indent=2))


if __name__ == "__main__":
    main()
