"""Depthwise backward benchmark: PyTorch's gradients (oneDNN on a CPU) against `cifake_core.depthwise`'s, layer by
layer, for every depthwise convolution of the detector at its training input size.

Each layer's input shape is recorded from one forward pass of a batch; then, on random channels-last tensors of
those shapes, as in training (after one warm-up call each), the input gradient is timed as PyTorch's and as a
transposed convolution, and the weight gradient as PyTorch's and, at the layers whose weight gradient the pipeline
takes from pixel pairs (`pairs_in_training`: kernel larger than input), from pairs; each two checked to agree. The
totals say what a training step spends on these gradients either way.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python bench/depthwise.py --stem_stride 1 --output depthwise.json
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.layers import finish, milliseconds, parse_arguments, random_training_inputs, table_cells  # noqa: E402
from cifake_core.depthwise import (  # noqa: E402
    CpuBackwardDepthwiseConv2d,
    depthwise_input_grad,
    depthwise_weight_grad,
    weight_grad_from_pairs,
)


def main() -> None:
    arguments = parse_arguments(__doc__.splitlines()[0], repeats=5)
    rows = []
    for layer, images, generator in random_training_inputs(CpuBackwardDepthwiseConv2d, arguments):
        shape = tuple(images.shape)
        output = torch.nn.functional.conv2d(images, layer.weight, None, layer.stride, layer.padding, 1, layer.groups)
        grad_output = torch.randn(output.shape, generator=generator).contiguous(memory_format=torch.channels_last)

        layout = (layer.stride, layer.padding)
        timed = {
            "input_pytorch": functools.partial(
                torch.nn.grad.conv2d_input, shape, layer.weight, grad_output, *layout, 1, layer.groups
            ),
            "input_transposed": functools.partial(depthwise_input_grad, shape, layer.weight, grad_output, *layout),
            "weight_pytorch": functools.partial(
                torch.nn.grad.conv2d_weight, images, layer.weight.shape, grad_output, *layout, 1, layer.groups
            ),
        }
        pairs_in_training = weight_grad_from_pairs(layer.kernel_size, shape)
        if pairs_in_training:
            # Elsewhere the pairs' products, and the memory they take, grow with the square of the input's pixels.
            timed["weight_pairs"] = functools.partial(
                depthwise_weight_grad, images, grad_output, layer.kernel_size, *layout
            )
        with torch.no_grad():
            torch.testing.assert_close(timed["input_transposed"](), timed["input_pytorch"](), rtol=1e-3, atol=1e-2)
            if pairs_in_training:
                torch.testing.assert_close(timed["weight_pairs"](), timed["weight_pytorch"](), rtol=1e-3, atol=1e-2)
            row = {
                "input": list(shape),
                "kernel": layer.kernel_size[0],
                "stride": layer.stride[0],
                "pairs_in_training": pairs_in_training,
            } | {f"{name}_ms": milliseconds(work, arguments.repeats) for name, work in timed.items()}
        rows.append(row)
        print(f"[bench] {row}", flush=True)

    print(
        "\n| input | kernel, stride | input grad: PyTorch | transposed | weight grad: PyTorch | pixel pairs |"
        "\n|---|---|---|---|---|---|"
    )
    for row in rows:
        pytorch, pairs = table_cells(row["weight_pytorch_ms"], row.get("weight_pairs_ms"), row["pairs_in_training"])
        print(
            f"| {'x'.join(map(str, row['input']))} | {row['kernel']}, {row['stride']} | {row['input_pytorch_ms']:.1f} "
            f"| **{row['input_transposed_ms']:.1f}** | {pytorch} | {pairs} |"
        )
    totals = {
        "all_pytorch_ms": sum(row["input_pytorch_ms"] + row["weight_pytorch_ms"] for row in rows),
        "pipeline_ms": sum(
            row["input_transposed_ms"] + row["weight_pairs_ms" if row["pairs_in_training"] else "weight_pytorch_ms"]
            for row in rows
        ),
    }
    summary = (
        f"both gradients, per batch: PyTorch's {totals['all_pytorch_ms']:.0f} ms, "
        f"the pipeline's {totals['pipeline_ms']:.0f} ms (bold)"
    )
    finish(arguments, rows, totals, summary)


if __name__ == "__main__":
    main()
