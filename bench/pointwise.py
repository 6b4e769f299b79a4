"""1x1 convolution benchmark: oneDNN's convolution against `cifake_core.pointwise`'s matrix products, layer by
layer, for every 1x1 convolution of the detector at its training input size.

Each layer's input shape is recorded from one forward pass of a batch; then, on random tensors of those shapes
(after one warm-up call each), a forward and backward pass (input, weight and bias gradients) is timed both ways
and the two checked to agree. `matmul` marks the layers the pipeline runs as matrix products (inputs of at most
`pointwise.MATMUL_MAX_PIXELS` pixels); the totals say what a training step spends on these layers either way.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python bench/pointwise.py --stem_stride 1 --output pointwise.json
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.layers import finish, milliseconds, parse_arguments, random_training_inputs, table_cells  # noqa: E402
from cifake_core.pointwise import MATMUL_MAX_PIXELS, MatmulPointwiseConv2d, matmul_pointwise  # noqa: E402


def forward_backward(convolution, images, weight, bias, grad_output) -> tuple[torch.Tensor, ...]:
    """The output and the input, weight and bias gradients of `convolution(images, weight, bias)`."""
    leaves = [tensor.detach().requires_grad_() for tensor in (images, weight, bias) if tensor is not None]
    output = convolution(*leaves, *([None] if bias is None else []))
    output.backward(grad_output)
    return output.detach(), *(leaf.grad for leaf in leaves)


def main() -> None:
    arguments = parse_arguments(__doc__.splitlines()[0], repeats=10)
    rows = []
    for layer, images, generator in random_training_inputs(MatmulPointwiseConv2d, arguments):
        shape = tuple(images.shape)
        weight = layer.weight.detach()
        bias = None if layer.bias is None else layer.bias.detach()
        output_shape = (shape[0], layer.out_channels, *shape[2:])
        grad_output = torch.randn(output_shape, generator=generator).contiguous(memory_format=torch.channels_last)
        work = {"onednn": F.conv2d, "matmul": matmul_pointwise}
        results = {
            name: forward_backward(convolution, images, weight, bias, grad_output) for name, convolution in work.items()
        }
        torch.testing.assert_close(results["matmul"], results["onednn"], rtol=1e-3, atol=1e-3)
        row = {
            "input": list(shape),
            "output_channels": layer.out_channels,
            "matmul_in_training": shape[-2] * shape[-1] <= MATMUL_MAX_PIXELS,
        } | {
            f"{name}_ms": milliseconds(
                functools.partial(forward_backward, convolution, images, weight, bias, grad_output), arguments.repeats
            )
            for name, convolution in work.items()
        }
        rows.append(row)
        print(f"[bench] {row}", flush=True)

    print("\n| input | output channels | oneDNN | matrix products | ratio |\n|---|---|---|---|---|")
    for row in rows:
        onednn, matmul = table_cells(row["onednn_ms"], row["matmul_ms"], row["matmul_in_training"])
        print(
            f"| {'x'.join(map(str, row['input']))} | {row['output_channels']} | {onednn} | {matmul} "
            f"| {row['onednn_ms'] / row['matmul_ms']:.2f}x |"
        )
    totals = {
        "all_onednn_ms": sum(row["onednn_ms"] for row in rows),
        "all_matmul_ms": sum(row["matmul_ms"] for row in rows),
        "pipeline_ms": sum(row["matmul_ms" if row["matmul_in_training"] else "onednn_ms"] for row in rows),
    }
    summary = (
        f"forward and backward, per batch: all oneDNN {totals['all_onednn_ms']:.0f} ms, all matrix products "
        f"{totals['all_matmul_ms']:.0f} ms, the pipeline's {totals['pipeline_ms']:.0f} ms (bold)"
    )
    finish(arguments, rows, totals, summary)


if __name__ == "__main__":
    main()
