"""Settings of the training step by device (`engine.keep_freed_memory_for_reuse`, `engine.training_memory_format`)
and the choice of hard examples (`engine.select_hard_examples`)."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys

import pytest
import torch

from cifake_core.engine import (
    GPU_CHANNELS_LAST_MIN_BATCH,
    one_cycle_optimizer,
    select_hard_examples,
    training_memory_format,
)
from cifake_core.models import create_model

# Counts the page faults of allocating and filling a 64 MB tensor 20 times, as a training step does with its
# activations, in a fresh process (the setting is process-wide), with the setting when argv[1] is "keep". The
# first allocations are not counted: the heap grows over the first few (about 8 here) before it holds a
# 64-byte aligned block of that size for reuse.
_FAULTS_OF_REPEATED_ALLOCATIONS = """
import resource, sys, torch
from cifake_core.engine import keep_freed_memory_for_reuse
if sys.argv[1] == "keep":
    assert keep_freed_memory_for_reuse()
for _ in range(20):
    torch.empty(16 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(*modes: str) -> list[int]:
    """Each mode's count, from processes run side by side (importing torch is most of their time)."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _FAULTS_OF_REPEATED_ALLOCATIONS, mode], stdout=subprocess.PIPE, text=True
        )
        for mode in modes
    ]
    outputs = [process.communicate()[0] for process in processes]
    assert all(process.returncode == 0 for process in processes)
    return [int(output) for output in outputs]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_freed_activations_are_reused_without_faulting_their_pages_in_again():
    pages_per_tensor = (64 << 20) // resource.getpagesize()
    default, kept = _page_faults("default", "keep")
    assert kept < pages_per_tensor
    assert kept * 10 < default


def test_training_lies_channels_last_on_a_cpu_and_on_a_gpu_only_at_large_batches():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert training_memory_format(cpu, 16) == training_memory_format(cpu, 4096) == torch.channels_last
    assert training_memory_format(gpu, 256) == torch.contiguous_format
    assert training_memory_format(gpu, GPU_CHANNELS_LAST_MIN_BATCH) == torch.channels_last


def test_hard_examples_are_drawn_by_their_last_loss_and_easy_ones_still_sometimes():
    losses = torch.rand(1000, generator=torch.Generator().manual_seed(1))
    rank = torch.argsort(torch.argsort(losses))
    picked = select_hard_examples(losses, 0.5, torch.Generator().manual_seed(0))
    assert len(picked) == len(picked.unique()) == 500
    hardest, easiest = (rank[picked] >= 900).sum(), (rank[picked] < 100).sum()
    assert hardest >= 80 and 0 < easiest <= 10
    everything = select_hard_examples(losses, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(everything.sort().values, torch.arange(1000))
    assert len(select_hard_examples(losses, 1e-6, torch.Generator().manual_seed(0))) == 1


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
def test_weight_decay_shrinks_convolution_and_linear_weights_only(optimizer_name: str):
    """One step with every gradient 0: decay alone moves the weights. Convolution and linear weights shrink by
    lr x weight_decay (AdamW's, decoupled) or by lr x weight_decay x (1 + momentum) (SGD's first Nesterov step on
    a gradient of weight_decay x weight); BatchNorm's scales and shifts and the biases stay where they were."""
    model, _ = create_model("false", "", stem_stride=1)
    optimizer, _ = one_cycle_optimizer(model, optimizer_name, lr=0.004, weight_decay=0.05, total_steps=10)
    momentum = optimizer.param_groups[0].get("momentum", 0.0)  # the schedule's, 0.95 at the start
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    for name, parameter in model.named_parameters():
        expected = before[name] * (1 - lr * 0.05 * (1 + momentum)) if parameter.ndim > 1 else before[name]
        assert torch.allclose(parameter.detach(), expected, rtol=1e-6, atol=1e-9), name
    assert {parameter.ndim > 1 for parameter in model.parameters()} == {True, False}
