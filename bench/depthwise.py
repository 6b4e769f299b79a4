"""Depthwise backward benchmark: PyTorch's gradients (oneDNN on a CPU) against `cifake_core.depthwise`'s, layer by
layer, for every depthwise convolution of the detector at its training input size.

Each layer's input shape is recorded from one forward pass of a batch; then, on random tensors of those shapes
(after one warm-up call each), the input gradient is timed as PyTorch's and as a transposed convolution, and
the weight gradient as PyTorch's and as slices, each pair checked to agree. `sliced` marks the layers whose weight
gradient the pipeline slices (kernel larger than input); the totals say what a training step spends on these
gradients either way.

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
from cifake_core.depthwise import (
    CpuBackwardDepthwiseConv2d,
    depthwise_input_grad,
    depthwise_weight_grad,
    slices_weight_grad,
)
from cifake_core.models import create_model


def _milliseconds(work, repeats: int) -> float:
    work()
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - started) / repeats * 1000


def depthwise_inputs(
    batch_size: int, image_size: int, stem_stride: int
) -> list[tuple[CpuBackwardDepthwiseConv2d, tuple]]:
    """Each depthwise layer of the detector with the shape of its input in a training batch."""
    model, _ = create_model(pretrained="false", pretrained_weights="", stem_stride=stem_stride)
    layers = [module for module in model.modules() if isinstance(module, CpuBackwardDepthwiseConv2d)]
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

        layout = (layer.stride, layer.padding)
        timed = {
            "input_pytorch": functools.partial(
                torch.nn.grad.conv2d_input, shape, layer.weight, grad_output, *layout, 1, layer.groups
            ),
            "input_transposed": functools.partial(depthwise_input_grad, shape, layer.weight, grad_output, *layout),
            "weight_pytorch": functools.partial(
                torch.nn.grad.conv2d_weight, images, layer.weight.shape, grad_output, *layout, 1, layer.groups
            ),
            "weight_sliced": functools.partial(depthwise_weight_grad, images, grad_output, layer.kernel_size, *layout),
        }
        with torch.no_grad():
            torch.testing.assert_close(timed["input_transposed"](), timed["input_pytorch"](), rtol=1e-3, atol=1e-2)
            torch.testing.assert_close(timed["weight_sliced"](), timed["weight_pytorch"](), rtol=1e-3, atol=1e-2)
            row = {
                "input": list(shape),
                "kernel": layer.kernel_size[0],
                "stride": layer.stride[0],
                "sliced_in_training": slices_weight_grad(layer.kernel_size, shape),
            } | {f"{name}_ms": _milliseconds(work, arguments.repeats) for name, work in timed.items()}
        rows.append(row)
        print(f"[bench] {row}", flush=True)

    print(
        "\n| input | kernel, stride | input grad: PyTorch | transposed | weight grad: PyTorch | sliced |"
        "\n|---|---|---|---|---|---|"
    )
    for row in rows:
        weight = [f"{row['weight_pytorch_ms']:.1f}", f"{row['weight_sliced_ms']:.1f}"]
        weight[row["sliced_in_training"]] = f"**{weight[row['sliced_in_training']]}**"
        print(
            f"| {'x'.join(map(str, row['input']))} | {row['kernel']}, {row['stride']} | {row['input_pytorch_ms']:.1f} "
            f"| **{row['input_transposed_ms']:.1f}** | {weight[0]} | {weight[1]} |"
        )
    totals = {
        "all_pytorch_ms": sum(row["input_pytorch_ms"] + row["weight_pytorch_ms"] for row in rows),
        "pipeline_ms": sum(
            row["input_transposed_ms"] + row["weight_sliced_ms" if row["sliced_in_training"] else "weight_pytorch_ms"]
            for row in rows
        ),
    }
    print(
        f"\nboth gradients, per batch: PyTorch's {totals['all_pytorch_ms']:.0f} ms, "
        f"the pipeline's {totals['pipeline_ms']:.0f} ms (bold)"
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
