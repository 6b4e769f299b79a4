"""Depthwise weight-gradient benchmark: PyTorch's (oneDNN on a CPU) against `cifake_core.depthwise`'s slices,
layer by layer, for every depthwise convolution of the detector at its training input size.

Each layer's input shape is recorded from one forward pass of a batch; both gradients are then timed on random
tensors of those shapes (after one warm-up call) and checked to agree. `sliced` marks the layers the pipeline
slices (kernel larger than input); the totals say what a training step spends on these gradients either way.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python bench/depthwise.py --stem_stride 1 --output depthwise.json
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch

from cifake_core.config import ModelConfig
from cifake_core.depthwise import SlicedWeightGradConv2d, depthwise_weight_grad
from cifake_core.models import create_model


def _milliseconds(work, repeats: int) -> float:
    work()
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - started) / repeats * 1000


def depthwise_inputs(batch_size: int, image_size: int, stem_stride: int) -> list[tuple[SlicedWeightGradConv2d, tuple]]:
    """Each depthwise layer of the detector with the shape of its input in a training batch."""
    model, _ = create_model(pretrained="false", pretrained_weights="", stem_stride=stem_stride)
    layers = [module for module in model.modules() if isinstance(module, SlicedWeightGradConv2d)]
    shapes: dict[int, tuple] = {}

    def record(layer, inputs, output):
        shapes[id(layer)] = tuple(inputs[0].shape)

    hooks = [layer.register_forward_hook(record) for layer in layers]
    with torch.no_grad():
        model.eval()(torch.zeros(batch_size, 3, image_size, image_size, dtype=torch.uint8))
    for hook in hooks:
        hook.remove()
    return [(layer, shapes[id(layer)]) for layer in layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=ModelConfig.image_size)
    parser.add_argument("--stem_stride", type=int, default=ModelConfig.stem_stride, choices=(1, 2))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="", help="write the figures to this JSON file")
    arguments = parser.parse_args()

    rows = []
    generator = torch.Generator().manual_seed(0)
    for layer, shape in depthwise_inputs(arguments.batch_size, arguments.image_size, arguments.stem_stride):
        images = torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last)
        output = torch.nn.functional.conv2d(images, layer.weight, None, layer.stride, layer.padding, 1, layer.groups)
        grad_output = torch.randn(output.shape, generator=generator)

        pytorchs = functools.partial(
            torch.nn.grad.conv2d_weight,
            images,
            layer.weight.shape,
            grad_output,
            layer.stride,
            layer.padding,
            1,
            layer.groups,
        )
        sliced = functools.partial(
            depthwise_weight_grad, images, grad_output, layer.kernel_size, layer.stride, layer.padding
        )
        torch.testing.assert_close(sliced(), pytorchs(), rtol=1e-3, atol=1e-2)
        row = {
            "input": list(shape),
            "kernel": layer.kernel_size[0],
            "stride": layer.stride[0],
            "sliced_in_training": max(layer.kernel_size) > min(shape[-2:]),
            "pytorch_ms": _milliseconds(pytorchs, arguments.repeats),
            "sliced_ms": _milliseconds(sliced, arguments.repeats),
        }
        rows.append(row)
        print(f"[bench] {row}", flush=True)

    print("\n| input | kernel, stride | PyTorch ms | sliced ms | pipeline uses |\n|---|---|---|---|---|")
    for row in rows:
        used = "sliced" if row["sliced_in_training"] else "PyTorch"
        print(
            f"| {'x'.join(map(str, row['input']))} | {row['kernel']}, {row['stride']} | {row['pytorch_ms']:.1f} "
            f"| {row['sliced_ms']:.1f} | {used} |"
        )
    totals = {
        "all_pytorch_ms": sum(row["pytorch_ms"] for row in rows),
        "pipeline_ms": sum(row["sliced_ms" if row["sliced_in_training"] else "pytorch_ms"] for row in rows),
    }
    print(
        f"\nper batch: PyTorch everywhere {totals['all_pytorch_ms']:.0f} ms, "
        f"the pipeline {totals['pipeline_ms']:.0f} ms"
    )
    if arguments.output:
        with open(arguments.output, "w") as handle:
            json.dump(
                {"arguments": vars(arguments), "threads": torch.get_num_threads(), "layers": rows, **totals},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
