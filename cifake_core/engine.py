"""The training step and evaluation, over uint8 image tensors held in memory (on the device when it is a GPU).

`train_one_epoch` and `evaluate` return flat `dict[str, float]` with fixed prefixed keys (`train_loss`,
`val_auc`, ...), ready to log as metrics. Augmentation runs on tensors on the device, so the input pipeline
never decodes a file during training: always a random horizontal flip; with `translate`, a random shift
of a few pixels (reflect-padded, as in CIFAR training); with `augment`, also degradations
like those of the robustness report (`robustness.py`): each image, with probability AUGMENT_PROBABILITY,
is down- and up-scaled, blurred, noised or cropped and resized, at a random strength. JPEG re-encoding is
not among them: it has no cheap tensor op on every device. Its effects are partly covered (blur and
rescaling remove the high frequencies it quantises away, noise adds error) but not its 8x8 block grid, so
the robustness report's JPEG rows measure how far that approximation carries.

Usage:
    device = distributed.resolve_device("auto")
    metrics = train_one_epoch(model, images, labels, torch.randperm(len(images)), optimizer, scheduler,
                              batch_size=128, device=device, generator=torch.Generator().manual_seed(0))
    metrics |= evaluate(model, val_images, val_labels, batch_size=256, device=device, prefix="val")
"""

from __future__ import annotations

import ctypes
import math
import platform
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur
from tqdm.auto import tqdm

from cifake_core.distributed import all_reduce_sum, gather_shards, shard_bounds
from cifake_core.metrics import binary_metrics
from cifake_core.models import fold_batchnorm

AUGMENT_PROBABILITY = 0.5
# Strength ranges, drawn per batch (per image for noise), around the robustness report's fixed settings.
RESCALE_RANGE = (0.4, 0.8)
BLUR_SIGMA_RANGE = (0.5, 1.5)
NOISE_SIGMA_RANGE = (2.0, 12.0)
CROP_FRACTION_RANGE = (0.7, 0.95)
# glibc's mallopt options, and how much freed memory the process keeps: well above the tens of megabytes of
# one activation at batch 128, well below any training machine's memory.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_RETAINED_HEAP_BYTES = 1 << 30
# On an H100, channels_last makes the training step 0.83x as fast as NCHW at batch 128, 0.84x at 256 and 1.80x at
# 1024 (512 not measured).
GPU_CHANNELS_LAST_MIN_BATCH = 512


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of handing it back to the kernel;
    returns whether it could (only on glibc). Process-wide: call it once, before training on a CPU.

    A training step allocates and frees activations of tens of megabytes. glibc maps blocks that large afresh
    at each allocation and unmaps them when freed, so every step faults each of their pages back in, zeroed by
    the kernel: 285 page faults per image and 11% of the 8-epoch CIFAKE run's CPU time spent in the kernel
    (docs/BENCHMARKS.md, "Freed memory kept for reuse")."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the C library this interpreter already runs on
    return all(libc.mallopt(option, _RETAINED_HEAP_BYTES) == 1 for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))


def training_memory_format(device: torch.device, batch_size: int) -> torch.memory_format:
    """How the model and its training batches lie in memory: channels_last on a CPU, where it makes the step
    1.2-1.3x faster, and on a GPU at large batches; NCHW on a GPU at small ones (docs/BENCHMARKS.md, "On one GPU")."""
    if device.type == "cpu" or batch_size >= GPU_CHANNELS_LAST_MIN_BATCH:
        return torch.channels_last
    return torch.contiguous_format


def to_device_tensors(
    images: np.ndarray, labels: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's uint8 images and labels as tensors on `device` (CIFAKE's 100k images are 300 MB as uint8)."""
    return torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)


def one_cycle_schedule(
    optimizer: torch.optim.Optimizer, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.OneCycleLR:
    """The recipe's schedule: the learning rate warming up to `lr` and annealing over `total_steps` steps (one
    `scheduler.step()` per optimiser step)."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)


def weight_decay_groups(parameters: Iterable[torch.nn.Parameter]) -> list[dict[str, Any]]:
    """`parameters` as two optimiser groups: the convolution and linear weights (more than one dimension), decayed at
    the optimiser's `weight_decay`, and the 1-D rest (BatchNorm's scales and shifts, the biases), not decayed."""
    # Decaying BatchNorm's scales and shifts and the biases pulls them towards 0 with nothing to gain: they set each
    # channel's scale and offset, not the capacity that decay limits (timm's filter_bias_and_bn does the same).
    parameters = list(parameters)
    return [
        {"params": [parameter for parameter in parameters if parameter.ndim > 1]},
        {"params": [parameter for parameter in parameters if parameter.ndim <= 1], "weight_decay": 0.0},
    ]


def one_cycle_optimizer(
    model: torch.nn.Module, optimizer: str, lr: float, weight_decay: float, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
    """The recipe's optimiser and schedule: `optimizer` ("adamw", or "sgd": Nesterov momentum) under
    `one_cycle_schedule`, `weight_decay` on the convolution and linear weights only (`weight_decay_groups`). AdamW
    decouples the decay from the gradient; SGD adds it to the gradient (L2), so each wants its own `weight_decay`."""
    groups = weight_decay_groups(model.parameters())
    if optimizer == "sgd":
        # The one-cycle schedule cycles the momentum between 0.85 and 0.95 against the learning rate (as it cycles
        # AdamW's first beta): 0.9 is the starting value it replaces. Held at 0.9 instead, the momentum scored lower
        # on CIFAKE (docs/BENCHMARKS.md, "Shifted views at test time, a constant momentum...").
        chosen = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        chosen = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    return chosen, one_cycle_schedule(chosen, lr, total_steps)


def selected_count(count: int, fraction: float) -> int:
    """How many of `count` training images an epoch with `select_fraction=fraction` trains on (at least one)."""
    return max(1, round(fraction * count))


def select_hard_examples(losses: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The indices of `selected_count(len(losses), fraction)` training images, drawn without replacement, each
    weighted by the percentile of its last training loss raised to `1 / fraction - 1`: Selective Backprop's rule
    (Jiang et al., 2019), so the hardest images are nearly always drawn and the easiest still sometimes, which
    refreshes their stale losses. `losses` and `generator` on the CPU."""
    count = len(losses)
    percentile = (torch.argsort(torch.argsort(losses)) + 1).double() / count
    weights = percentile ** (1 / fraction - 1)
    return torch.multinomial(weights, selected_count(count, fraction), replacement=False, generator=generator)


def batch_starts(count: int, batch_size: int) -> range:
    """Where each training batch of an epoch of `count` images starts: one optimiser step each."""
    # A lone trailing image is left out: BatchNorm cannot train on a batch of one (at 32 px the last stage is 1x1).
    return range(0, count - 1, batch_size)


def to_device_without_waiting(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (random draws) on `device`. Copying pageable memory to a GPU makes the host wait for
    every kernel queued before it; from pinned memory it does not, so the host keeps queueing the step."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def random_flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 0.5, drawn from `generator`."""
    flip = torch.rand(batch.shape[0], generator=generator) < 0.5
    return torch.where(to_device_without_waiting(flip, batch.device).view(-1, 1, 1, 1), batch.flip(-1), batch)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices up to `size - 1` outside [0, size) mirrored back into it, as in reflect padding (-1 -> 1)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def random_translate(batch: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to `max_shift` pixels along each axis (drawn per image from `generator`), the
    uncovered border filled by reflecting the image; the result is channels_last."""
    shifts = torch.randint(-max_shift, max_shift + 1, (len(batch), 2), generator=generator)
    return translate(batch, to_device_without_waiting(shifts, batch.device))


def translate(batch: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Image k moved so that pixel (i, j) shows the original's (i + shifts[k, 0], j + shifts[k, 1]), the uncovered
    border filled by reflecting the image; `shifts` (count, 2) on the batch's device; the result is channels_last."""
    count, _, height, width = batch.shape
    rows = _reflect(torch.arange(height, device=batch.device) + shifts[:, :1], height)
    columns = _reflect(torch.arange(width, device=batch.device) + shifts[:, 1:], width)
    images = torch.arange(count, device=batch.device).view(-1, 1, 1)
    # Advanced indices around the channel slice put the indexed dimensions first: (count, height, width, channels).
    return batch[images, :, rows.unsqueeze(2), columns.unsqueeze(1)].permute(0, 3, 1, 2)


def _uniform(bounds: tuple[float, float], generator: torch.Generator, count: int = 1) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(count, generator=generator)


def degrade(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each uint8 image, with probability AUGMENT_PROBABILITY, rescaled down and up, blurred, noised, or cropped and
    resized back (one of the four, equally likely); the rest unchanged. All randomness comes from `generator`."""
    count, _, height, width = batch.shape
    images = batch.float()
    factor = float(_uniform(RESCALE_RANGE, generator))
    smaller = F.interpolate(
        images, size=(max(1, round(height * factor)), max(1, round(width * factor))), mode="bilinear", antialias=True
    )
    rescaled = F.interpolate(smaller, size=(height, width), mode="bilinear")
    sigma = float(_uniform(BLUR_SIGMA_RANGE, generator))
    blurred = gaussian_blur(images, kernel_size=[2 * math.ceil(3 * sigma) + 1] * 2, sigma=[sigma, sigma])
    noise_sigma = _uniform(NOISE_SIGMA_RANGE, generator, count).view(-1, 1, 1, 1)
    noise = noise_sigma * torch.randn(batch.shape, generator=generator)
    noised = images + to_device_without_waiting(noise, batch.device)
    fraction = float(_uniform(CROP_FRACTION_RANGE, generator))
    crop_height, crop_width = max(1, round(height * fraction)), max(1, round(width * fraction))
    top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator))
    cropped = F.interpolate(
        images[:, :, top : top + crop_height, left : left + crop_width], size=(height, width), mode="bilinear"
    )
    # Choice 0 keeps the image; 1-4 pick one degradation.
    kept = torch.rand(count, generator=generator) >= AUGMENT_PROBABILITY
    choice = to_device_without_waiting(
        torch.where(kept, 0, torch.randint(1, 5, (count,), generator=generator)), batch.device
    )
    candidates = torch.stack([images, rescaled, blurred, noised, cropped])
    chosen = candidates[choice, torch.arange(count, device=batch.device)]
    return chosen.round().clamp(0, 255).to(torch.uint8)


def train_one_epoch(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    order: Sequence[int],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator,
    description: str = "train",
    translate: int = 0,
    augment: bool = False,
    label_smoothing: float = 0.0,
    grad_clip_norm: float = 0.0,
    sample_losses: torch.Tensor | None = None,
) -> dict[str, float]:
    """One pass over the training images at `order` (this process's share of the epoch, shuffled; see
    `distributed.epoch_sampler`): loss, accuracy, learning rate and speed, summed over all processes.
    `translate` > 0 adds a random shift of up to that many pixels (`random_translate`) to the random flip, `augment`
    the `degrade` augmentations; `train_loss` is the smoothed loss;
    `grad_clip_norm` > 0 scales each step's gradients down to at most that norm; `sample_losses`, a tensor
    on `device` with one entry per training image, gets each trained image's loss at its index."""
    model.train()
    started = time.perf_counter()
    order = torch.as_tensor(order, dtype=torch.long, device=images.device)
    # Summed on the device and read once at the end: reading them every step would make the host wait for the
    # GPU at every step, so that launching the next step's kernels could never overlap running this one's.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    memory_format = training_memory_format(device, batch_size)
    for start in tqdm(batch_starts(len(order), batch_size), desc=description, unit="batch", leave=False, disable=None):
        index = order[start : start + batch_size]
        batch = random_flip(images[index].to(device, non_blocking=True), generator)
        if translate:
            batch = random_translate(batch, translate, generator)
        if augment:
            batch = degrade(batch, generator)
        targets = labels[index].to(device, non_blocking=True)
        logits = model(batch.contiguous(memory_format=memory_format))
        losses = F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none")
        if sample_losses is not None:
            sample_losses[index.to(device, non_blocking=True)] = losses.detach()
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimizer.step()
        scheduler.step()
        total_loss += loss.detach().double() * len(index)
        correct += (logits.argmax(1) == targets).sum()
        seen += len(index)
    # Read before the clock stops: reading waits for the GPU, so the epoch's time includes all its queued work.
    totals = torch.tensor([total_loss.item(), correct.item(), seen], dtype=torch.float64)
    seconds = time.perf_counter() - started
    total_loss, correct, seen = all_reduce_sum(totals).tolist()
    return {
        "train_loss": total_loss / seen,
        "train_accuracy": correct / seen,
        "learning_rate": scheduler.get_last_lr()[0],
        "epoch_seconds": seconds,
        "images_per_second": seen / seconds,
    }


def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits for every image, in order, on the CPU, scored by `fold_batchnorm(model)`: the same logits, faster."""
    return batched_logits(fold_batchnorm(model), images, batch_size, device)


@torch.no_grad()
def batched_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Logits for every image, in order, on the CPU, from `model` as it is, in evaluation mode."""
    model.eval()
    chunks = [
        model(images[start : start + batch_size].to(device)).float().cpu()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


def sharded_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """`predict_logits` split over the processes: each scores its shard and all get every logit, in order.
    Every process must call it; alone, it is `predict_logits`."""
    start, stop = shard_bounds(len(images))
    return gather_shards(predict_logits(model, images[start:stop], batch_size, device), len(images))


def prob_ai(logits: torch.Tensor) -> torch.Tensor:
    """The probability of class `ai` (index 1); the exported ONNX graph ends with this same function."""
    return torch.softmax(logits.float(), dim=1)[:, 1]


def logit_metrics(logits: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
    """Loss, AUC, accuracy, F1 and friends at threshold 0.5 of a split's logits; keys prefixed with `prefix`."""
    targets = labels.cpu()
    metrics = binary_metrics(targets.numpy(), prob_ai(logits).numpy(), 0.5, prefix)
    return {f"{prefix}_loss": float(F.cross_entropy(logits, targets))} | metrics


def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device,
    prefix: str,
) -> dict[str, float]:
    """`logit_metrics` of one whole split scored by `model`.

    With several processes each scores its shard and all get every logit (`sharded_logits`), so all compute
    the same figures; every process must call it."""
    return logit_metrics(sharded_logits(model, images, batch_size, device), labels, prefix)
