"""Training-step benchmark: what each speed option buys over the plain eager fp32 loop, measured in one run.

The detector (`models.create_model`, random weights) trains on uint8 tensors already in memory, as the
pipeline does, with AdamW and a one-cycle schedule. Measured, each after warm-up steps:
  - the input side alone (index a batch, random flip, move to the device) against a whole step;
  - the baseline: eager fp32, NCHW;
  - channels_last; channels_last with bf16 autocast; both of these under `torch.compile` (`--compile`);
  - channels_last with the depthwise layers' CPU backward pass (`cifake_core.depthwise`), and with it the 1x1
    layers' matrix products on small inputs (`cifake_core.pointwise`): the pipeline's step (every other variant
    runs PyTorch's own convolutions for the layers whose path its name leaves out);
  - on a CPU, also the pipeline's step with oneDNN computing the float32 matrix products in bfloat16
    (`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`: AMX or AVX-512 BF16 units where the CPU has them);
  - on a GPU, also channels_last reading the loss back every step (`host_sync`: the host waits for the GPU
    at each step, as the pipeline's loop did before it summed on the device) and with `cudnn.benchmark`;
  - on a CPU, `--processes 2` also times two 1-thread processes side by side against one process using
    every thread (what data-parallel training on one machine trades);
  - on a CPU, `--allocator_rounds N` also times the pipeline's step in fresh 1-thread processes with glibc's
    malloc as it comes and with `engine.keep_freed_memory_for_reuse` (a process-wide setting, which the
    pipeline makes and every other measurement here does not), the two alternating N times, with page
    faults per image and the share of CPU time spent in the kernel.
Prints a progress line per measurement and a Markdown table; `--output FILE.json` keeps the figures; `--profile`
also prints where the pipeline's step spends its time, by operation (`torch.profiler`).

Usage:
    .venv/bin/python bench/training_step.py --compile --processes 2 --output docs/training_step.json
    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python bench/training_step.py --allocator_rounds 3
    OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python bench/training_step.py --steps 30 --profile
    python3 bench/training_step.py --device cuda --batch_size 256 --steps 200 --warmup 20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from cifake_core.config import ModelConfig
from cifake_core.depthwise import CpuBackwardDepthwiseConv2d
from cifake_core.distributed import resolve_device
from cifake_core.engine import keep_freed_memory_for_reuse, random_flip
from cifake_core.models import create_model
from cifake_core.pointwise import MatmulPointwiseConv2d

# What the pipeline trains with on a CPU: both of `models.create_model`'s CPU paths.
PIPELINE_STEP = "channels_last_depthwise_backward_matmul_pointwise"
BFLOAT16_PRODUCTS = f"{PIPELINE_STEP}_bfloat16_products"
# The precision the pipeline's products run at: the process's own ("none", PyTorch's float32 unless set otherwise).
PIPELINE_PRODUCTS_PRECISION = torch.backends.mkldnn.matmul.fp32_precision


def _images(count: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
    return images.to(device), torch.randint(0, 2, (count,), generator=generator).to(device)


def _batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, steps: int):
    """The pipeline's input side: a shuffled index, its random flip (`engine.random_flip`), on the device."""
    order = torch.randperm(len(images)).to(images.device)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        index = order[(step * batch_size) % len(images) :][:batch_size]
        yield random_flip(images[index], generator), labels[index]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_images_per_second(images, labels, batch_size: int, steps: int, device: torch.device) -> float:
    _synchronize(device)
    started = time.perf_counter()
    for batch, _ in _batches(images, labels, batch_size, steps):
        batch.float().sum()  # consume it, as the model's first layer would
    _synchronize(device)
    return batch_size * steps / (time.perf_counter() - started)


def step_images_per_second(
    variant: str, images, labels, batch_size: int, steps: int, warmup: int, device: torch.device, stem_stride: int
) -> tuple[float, float]:
    """Images/s of training steps with `variant`, and the seconds its warm-up took (compilation included)."""
    torch.manual_seed(0)
    model, _ = create_model(pretrained="false", pretrained_weights="", stem_stride=stem_stride)
    model = model.to(device)
    cpu_paths = {"depthwise_backward": CpuBackwardDepthwiseConv2d, "matmul_pointwise": MatmulPointwiseConv2d}
    for module in model.modules():
        if any(isinstance(module, layer) and name not in variant for name, layer in cpu_paths.items()):
            module.__class__ = torch.nn.Conv2d
    if variant != "eager_fp32":
        model = model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = "cudnn_benchmark" in variant
    torch.backends.mkldnn.matmul.fp32_precision = (
        "bf16" if variant == BFLOAT16_PRODUCTS else PIPELINE_PRODUCTS_PRECISION
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=warmup + steps + 1)
    step_model = torch.compile(model) if "compile" in variant else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if "bf16" in variant else contextlib.nullcontext()
    model.train()
    started = time.perf_counter()
    for index, (batch, targets) in enumerate(_batches(images, labels, batch_size, warmup + steps)):
        if index == warmup:
            _synchronize(device)
            warmup_seconds, started = time.perf_counter() - started, time.perf_counter()
        if variant != "eager_fp32":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = F.cross_entropy(step_model(batch), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if "host_sync" in variant:
            loss.item()  # what the pipeline's loop did before it summed the loss on the device
    _synchronize(device)
    return batch_size * steps / (time.perf_counter() - started), warmup_seconds


def profile_table(images, labels, batch_size: int, steps: int, device: torch.device, stem_stride: int) -> str:
    """The pipeline's step, `steps` of them after the measurements above have warmed oneDNN's kernels up, as
    `torch.profiler`'s table of the 20 operations that take the most time by themselves."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    with torch.profiler.profile(activities=activities) as profiler:
        step_images_per_second(PIPELINE_STEP, images, labels, batch_size, steps, 0, device, stem_stride)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=20)


def _one_thread_worker(arguments: tuple[int, int, int, int, int, bool]) -> dict[str, float]:
    """The pipeline's step in this (fresh) process on one thread: images/s, and over warm-up and timed steps,
    minor page faults per image and the kernel's share of the CPU time."""
    batch_size, image_size, steps, warmup, stem_stride, keep_freed_memory = arguments
    if keep_freed_memory:
        keep_freed_memory_for_reuse()
    torch.set_num_threads(1)
    images, labels = _images(batch_size * 4, image_size, torch.device("cpu"))
    before = resource.getrusage(resource.RUSAGE_SELF)
    speed, _ = step_images_per_second(
        PIPELINE_STEP, images, labels, batch_size, steps, warmup, torch.device("cpu"), stem_stride
    )
    after = resource.getrusage(resource.RUSAGE_SELF)
    kernel, user = after.ru_stime - before.ru_stime, after.ru_utime - before.ru_utime
    return {
        "images_per_second": speed,
        "page_faults_per_image": (after.ru_minflt - before.ru_minflt) / (batch_size * (warmup + steps)),
        "kernel_share": kernel / (kernel + user),
    }


def compare_allocators(work: tuple[int, int, int, int, int], rounds: int) -> dict[str, dict[str, float]]:
    """Medians over `rounds` of the pipeline's 1-thread step with malloc as it comes and with freed memory kept,
    each measurement in a fresh process, the two settings alternating so that drift hits both alike."""
    runs = {"malloc_as_it_comes": [], "freed_memory_kept": []}
    context = multiprocessing.get_context("spawn")
    for round_index in range(rounds):
        for name, keep in (("malloc_as_it_comes", False), ("freed_memory_kept", True)):
            with context.Pool(1) as pool:
                run = pool.apply(_one_thread_worker, ((*work, keep),))
            runs[name].append(run)
            print(
                f"[bench] round {round_index + 1}/{rounds} {name}: {run['images_per_second']:.0f} img/s, "
                f"{run['page_faults_per_image']:.0f} page faults/image, kernel {run['kernel_share']:.1%}",
                flush=True,
            )
    return {
        name: {key: statistics.median(run[key] for run in measured) for key in measured[0]}
        for name, measured in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=ModelConfig.image_size)
    parser.add_argument("--stem_stride", type=int, default=ModelConfig.stem_stride, choices=(1, 2))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    parser.add_argument("--processes", type=int, default=0, help="CPU: also time N 1-thread processes at once")
    parser.add_argument(
        "--allocator_rounds", type=int, default=0, help="CPU: also compare malloc settings, N rounds of each"
    )
    parser.add_argument("--output", default="", help="write the figures to this JSON file")
    parser.add_argument("--profile", action="store_true", help="also print the pipeline's step by operation")
    arguments = parser.parse_args()

    device = resolve_device(arguments.device)
    batch_size, steps, warmup = arguments.batch_size, arguments.steps, arguments.warmup
    images, labels = _images(batch_size * 4, arguments.image_size, device)
    machine = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch_size": batch_size,
        "image_size": arguments.image_size,
        "stem_stride": arguments.stem_stride,
    }
    print(f"[bench] {machine}", flush=True)
    results = {"loader": loader_images_per_second(images, labels, batch_size, steps, device)}
    print(f"[bench] loader alone: {results['loader']:.0f} img/s", flush=True)
    warmups = {}
    compiled = ["channels_last_compile", "channels_last_bf16_compile"] if arguments.compile else []
    on_cuda = ["channels_last_host_sync", "channels_last_cudnn_benchmark"] if device.type == "cuda" else []
    cpu_path_variants = ["channels_last_depthwise_backward", PIPELINE_STEP]
    cpu_path_variants += [BFLOAT16_PRODUCTS] if device.type == "cpu" else []
    variants = ["eager_fp32", "channels_last", *on_cuda, *cpu_path_variants, "channels_last_bf16"]
    for variant in [*variants, *compiled]:
        results[variant], warmups[variant] = step_images_per_second(
            variant, images, labels, batch_size, steps, warmup, device, arguments.stem_stride
        )
        print(f"[bench] {variant}: {results[variant]:.0f} img/s (warm-up {warmups[variant]:.1f} s)", flush=True)
    work = (batch_size, arguments.image_size, steps, warmup, arguments.stem_stride)
    if arguments.processes and device.type == "cpu":
        name = f"{arguments.processes}x1_thread_processes"
        with multiprocessing.get_context("spawn").Pool(arguments.processes) as pool:
            runs = pool.map(_one_thread_worker, [(*work, True)] * arguments.processes)
        results[name] = sum(run["images_per_second"] for run in runs)
        print(f"[bench] {name}: {results[name]:.0f} img/s in all", flush=True)
    allocators = {}
    if arguments.allocator_rounds and device.type == "cpu":
        allocators = compare_allocators(work, arguments.allocator_rounds)
        results |= {f"1_thread_{name}": figures["images_per_second"] for name, figures in allocators.items()}

    if arguments.profile:
        print(profile_table(images, labels, batch_size, steps, device, arguments.stem_stride), flush=True)

    baseline = results["eager_fp32"]
    print("\n| measurement | images/s | vs eager fp32 |\n|---|---|---|")
    for name, value in results.items():
        print(f"| {name} | {value:.0f} | {value / baseline:.2f}x |")
    if arguments.output:
        with open(arguments.output, "w") as handle:
            figures = {
                "machine": machine,
                "images_per_second": results,
                "warmup_seconds": warmups,
                "allocators": allocators,
            }
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
