"""Data-parallel benchmark: what exchanging gradients costs the pipeline's CPU epoch, by DistributedDataParallel
setting, in N 1-thread processes on one machine (as `torchrun --nproc_per_node N ... --device cpu` trains).

Every process runs `engine.train_one_epoch` (the pipeline's step: channels_last, the depthwise CPU backward pass,
clipping, the config's optimiser with one-cycle) on random uint8 images in memory, with freed memory kept for reuse
as the pipeline keeps it. Variants, each timed over `--steps` steps after `--warmup` steps:
  - independent: no gradient exchange at all (the processes train separate models), the ceiling;
  - ddp: `distributed.wrap`, the pipeline's DistributedDataParallel over gloo;
  - ddp_bucket_view: with `gradient_as_bucket_view=True` (gradients live in the communication buckets, no copy);
  - ddp_fp16_hook: gradients sent as fp16 (`fp16_compress_hook`), half the bytes.
`--pin` pins process k to core k (the processes otherwise go where the scheduler puts them, as under torchrun).
`--rounds N` times every variant N times, alternating, and reports medians (a shared host's speed drifts by tens of
per cent over minutes). Prints a progress line per measurement and a Markdown table, the first variant the
reference; `--output FILE.json` keeps every figure.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python bench/data_parallel.py --processes 2 --output data_parallel.json
    OMP_NUM_THREADS=1 .venv/bin/python bench/data_parallel.py --variants ddp,independent --rounds 4 --steps 48
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from cifake_core import distributed
from cifake_core.config import ModelConfig, TrainConfig
from cifake_core.engine import keep_freed_memory_for_reuse, one_cycle_optimizer, train_one_epoch
from cifake_core.models import create_model
from cifake_core.network import free_port

VARIANTS = ("independent", "ddp", "ddp_bucket_view", "ddp_fp16_hook")
CPU = torch.device("cpu")


def _parallel(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    if variant == "independent":
        return model
    if variant == "ddp":
        return distributed.wrap(model, CPU)
    parallel = DistributedDataParallel(model, gradient_as_bucket_view=variant == "ddp_bucket_view")
    if variant == "ddp_fp16_hook":
        parallel.register_comm_hook(dist.group.WORLD, default_hooks.fp16_compress_hook)
    return parallel


def images_per_second(variant: str, batch_size: int, steps: int, warmup: int) -> float:
    """All processes' images/s over `steps` steps of `variant` (call in every process)."""
    torch.manual_seed(0)
    model, _ = create_model(pretrained="false", pretrained_weights="", stem_stride=ModelConfig.stem_stride)
    model = _parallel(model.to(memory_format=torch.channels_last), variant)
    generator = torch.Generator().manual_seed(distributed.rank())
    images = torch.randint(0, 256, (batch_size * steps, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 2, (batch_size * steps,), generator=generator)
    train = TrainConfig()
    optimizer, scheduler = one_cycle_optimizer(model, train.optimizer, train.lr, train.weight_decay, warmup + steps)
    settings = {"grad_clip_norm": train.grad_clip_norm, "generator": generator, "device": CPU}
    order = torch.randperm(len(images), generator=generator)
    train_one_epoch(model, images, labels, order[: batch_size * warmup], optimizer, scheduler, batch_size, **settings)
    return train_one_epoch(model, images, labels, order, optimizer, scheduler, batch_size, **settings)[
        "images_per_second"
    ]


def _worker(
    rank: int,
    processes: int,
    port: int,
    variants: list[str],
    rounds: int,
    pin: bool,
    batch_size: int,
    steps: int,
    warmup: int,
    output: str,
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(processes))
    if pin:
        os.sched_setaffinity(0, {rank % os.cpu_count()})
    torch.set_num_threads(1)
    keep_freed_memory_for_reuse()
    dist.init_process_group("gloo")
    try:
        results: dict[str, list[float]] = {variant: [] for variant in variants}
        # Variants alternate round by round, so that a shared host's drifting speed hits them all alike.
        for round_index in range(rounds):
            for variant in variants:
                results[variant].append(images_per_second(variant, batch_size, steps, warmup))
                if rank == 0:
                    speed = results[variant][-1]
                    print(f"[bench] round {round_index + 1}/{rounds} {variant}: {speed:.0f} img/s in all", flush=True)
        if rank == 0:
            medians = {variant: statistics.median(values) for variant, values in results.items()}
            reference = medians[variants[0]]
            print(f"\n| variant | images/s, all processes (median of {rounds}) | range | vs {variants[0]} |")
            print("|---|---|---|---|")
            for variant, values in results.items():
                span = f"{min(values):.0f}-{max(values):.0f}"
                print(f"| {variant} | {medians[variant]:.0f} | {span} | {medians[variant] / reference:.2f}x |")
            if output:
                with open(output, "w") as handle:
                    json.dump({"processes": processes, "batch_size": batch_size, "images_per_second": results}, handle)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=128, help="per process, as the pipeline's batch_size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pin", action="store_true", help="pin process k to core k")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=1, help="times each variant, alternating; medians reported")
    parser.add_argument("--output", default="", help="write the figures to this JSON file")
    arguments = parser.parse_args()
    variants = [variant for variant in arguments.variants.split(",") if variant]
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants {arguments.variants!r}: choose one or more of {', '.join(VARIANTS)}")
    if arguments.rounds < 1:
        parser.error(f"--rounds {arguments.rounds}: time each variant at least once (--rounds 1 or more)")
    print(
        f"[bench] {arguments.processes} processes of 1 thread, batch {arguments.batch_size} each, "
        f"{'pinned' if arguments.pin else 'not pinned'}",
        flush=True,
    )
    settings = (arguments.pin, arguments.batch_size, arguments.steps, arguments.warmup, arguments.output)
    mp.spawn(
        _worker,
        args=(arguments.processes, free_port(), variants, arguments.rounds, *settings),
        nprocs=arguments.processes,
    )


if __name__ == "__main__":
    main()
