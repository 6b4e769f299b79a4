"""Evaluation benchmark: images/s of `engine.predict_logits`, the call that scores val and test in training, by
batch size and memory layout (NCHW, channels_last), with the model's BatchNorm folded into its convolutions (what
`predict_logits` does) or separate, and its flip averaging on or off.

The detector from random weights (speed does not depend on the weights) scores the same uint8 images held in
memory, as the pipeline holds its splits, and on a CPU with freed memory kept for reuse as the pipeline keeps it
(without it every unfused layer's output is fresh memory, and the separate BatchNorm looks 1.5x slower than folded,
not 1.2x); each figure after one warm-up batch. On a CPU the batch size that fills the cache best, not the
largest, is the fastest: this is what `pipeline.CPU_EVAL_BATCH_SIZE` rests on.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python bench/evaluation.py --flip_tta true --output evaluation.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from cifake_core.config import SWITCH_CHOICES, ModelConfig
from cifake_core.distributed import resolve_device
from cifake_core.engine import batched_logits, keep_freed_memory_for_reuse, predict_logits
from cifake_core.models import create_model

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
SCORERS = {"folded": predict_logits, "separate": batched_logits}


def images_per_second(
    score: Callable, model: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
) -> float:
    score(model, images[:batch_size], batch_size, device)
    started = time.perf_counter()
    score(model, images, batch_size, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_sizes", default="32,64,128,256,512", help="comma-separated")
    parser.add_argument("--images", type=int, default=2048, help="images scored per measurement")
    parser.add_argument("--image_size", type=int, default=ModelConfig.image_size)
    parser.add_argument("--stem_stride", type=int, default=ModelConfig.stem_stride, choices=(1, 2))
    parser.add_argument("--flip_tta", default=ModelConfig.flip_tta, choices=SWITCH_CHOICES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="", help="write the figures to this JSON file")
    arguments = parser.parse_args()

    device = resolve_device(arguments.device)
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    model, _ = create_model(
        pretrained="false",
        pretrained_weights="",
        stem_stride=arguments.stem_stride,
        flip_tta=arguments.flip_tta == "true",
    )
    model = model.to(device)
    size = arguments.image_size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (arguments.images, 3, size, size), dtype=torch.uint8, generator=generator)
    rows = []
    for layout, memory_format in LAYOUTS.items():
        model = model.to(memory_format=memory_format)
        for batch_size in [int(value) for value in arguments.batch_sizes.split(",")]:
            for batchnorm, score in SCORERS.items():
                row = {
                    "layout": layout,
                    "batchnorm": batchnorm,
                    "batch_size": batch_size,
                    "images_per_second": images_per_second(score, model, images, batch_size, device),
                }
                rows.append(row)
                print(f"[bench] {row}", flush=True)

    baseline = rows[-1]
    print(
        f"\n| layout | BatchNorm | batch | images/s | vs {baseline['layout']}, {baseline['batchnorm']}, batch "
        f"{baseline['batch_size']} |\n|---|---|---|---|---|"
    )
    for row in rows:
        rate = row["images_per_second"]
        print(
            f"| {row['layout']} | {row['batchnorm']} | {row['batch_size']} | {rate:.0f} | "
            f"{rate / baseline['images_per_second']:.2f}x |"
        )
    if arguments.output:
        with open(arguments.output, "w") as handle:
            json.dump(
                {"arguments": vars(arguments), "threads": torch.get_num_threads(), "rows": rows}, handle, indent=2
            )


if __name__ == "__main__":
    main()
