"""BatchNorm benchmark: timm's BatchNormAct2d (BatchNorm and its activation) eager against `torch.compile`, layer by
layer, for every normalisation layer of the detector at its training input size.

BatchNorm is the largest share of the CPU training step (24% in `bench/training_step.py --profile`: memory-bound
passes over the maps, then the activations' passes), and whole-model `torch.compile` is slower than the eager step
on these CPUs. This shows where: each layer's input shape is recorded from one forward pass of a batch; then, on
random channels-last tensors of those shapes, in training mode (after one warm-up call each, and a first call that
compiles), a forward and backward pass (output, input, scale and shift gradients) is timed eagerly and compiled by
inductor, and the two checked to agree. The totals say what a training step spends on these layers either way, and
with each layer on its faster path.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python bench/batchnorm.py --stem_stride 1 --output batchnorm.json
"""

from __future__ import annotations

import copy
import functools
import sys
import time
from pathlib import Path

import torch
from timm.layers import BatchNormAct2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.layers import finish, milliseconds, parse_arguments, random_training_inputs, table_cells  # noqa: E402


def forward_backward(
    layer: torch.nn.Module, images: torch.Tensor, grad_output: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The output and the input, scale and shift gradients of `layer(images)` in training mode."""
    layer.zero_grad(set_to_none=True)
    leaf = images.detach().requires_grad_()
    output = layer(leaf)
    output.backward(grad_output)
    return output.detach(), leaf.grad, layer.weight.grad, layer.bias.grad


def main() -> None:
    arguments = parse_arguments(__doc__.splitlines()[0], repeats=10)
    # Every layer runs the same `forward` code, which dynamo compiles anew for each (its guards check the module):
    # past the default limit of 8 it would quietly run the rest eagerly, timing eager against eager.
    torch._dynamo.config.recompile_limit = 1024
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    rows = []
    for layer, images, generator in random_training_inputs(BatchNormAct2d, arguments):
        grad_output = torch.randn(images.shape, generator=generator).contiguous(memory_format=torch.channels_last)
        eager = layer.train()
        compiled = torch.compile(copy.deepcopy(layer), dynamic=False)
        started = time.perf_counter()
        compiled_result = forward_backward(compiled, images, grad_output)
        compile_s = time.perf_counter() - started
        eager_result = forward_backward(eager, images, grad_output)
        for compiled_tensor, eager_tensor in zip(compiled_result, eager_result, strict=True):
            # Rounding in another order can put an input on the other side of hardswish's steps at -3 and 3: a few
            # elements of the input gradient then differ by up to 0.5, and the sums over a channel by about 1%.
            agree = torch.isclose(compiled_tensor, eager_tensor, rtol=2e-2, atol=2e-2)
            assert agree.float().mean() > 0.9999, f"compiled and eager differ at {(~agree).sum()} elements"
        row = {
            "input": list(images.shape),
            "activation": type(layer.act).__name__,
            "compile_s": compile_s,
        } | {
            f"{name}_ms": milliseconds(
                functools.partial(forward_backward, module, images, grad_output), arguments.repeats
            )
            for name, module in (("eager", eager), ("compiled", compiled))
        }
        rows.append(row)
        print(f"[bench] {row}", flush=True)

    print("\n| input | activation | eager | compiled | ratio |\n|---|---|---|---|---|")
    for row in rows:
        eager_cell, compiled_cell = table_cells(row["eager_ms"], row["compiled_ms"], ours_in_training=False)
        print(
            f"| {'x'.join(map(str, row['input']))} | {row['activation']} | {eager_cell} | {compiled_cell} "
            f"| {row['eager_ms'] / row['compiled_ms']:.2f}x |"
        )
    totals = {
        "all_eager_ms": sum(row["eager_ms"] for row in rows),
        "all_compiled_ms": sum(row["compiled_ms"] for row in rows),
        "each_faster_ms": sum(min(row["eager_ms"], row["compiled_ms"]) for row in rows),
        "compile_s": sum(row["compile_s"] for row in rows),
    }
    summary = (
        f"forward and backward, per batch: all eager {totals['all_eager_ms']:.0f} ms (the pipeline's, bold), all "
        f"compiled {totals['all_compiled_ms']:.0f} ms after {totals['compile_s']:.0f} s of compiling, each layer on "
        f"its faster path {totals['each_faster_ms']:.0f} ms"
    )
    finish(arguments, rows, totals, summary)


if __name__ == "__main__":
    main()
