"""What the per-layer benchmarks (bench/depthwise.py, bench/pointwise.py) share: their command line, the detector's
layers of one kind each with a random input of the shape it gets in a training batch, a timer, the table's cells,
and the closing summary with its figures file.

Usage:
    arguments = parse_arguments(__doc__.splitlines()[0], repeats=5)
    for layer, images, generator in random_training_inputs(CpuBackwardDepthwiseConv2d, arguments): ...
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator

import torch

from cifake_core.config import ModelConfig
from cifake_core.engine import keep_freed_memory_for_reuse
from cifake_core.models import create_model


def parse_arguments(description: str, repeats: int) -> argparse.Namespace:
    """A per-layer benchmark's command line: the batch and the model it measures, how often, and where to write."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--image_size", type=int, default=ModelConfig.image_size)
    parser.add_argument("--stem_stride", type=int, default=ModelConfig.stem_stride, choices=(1, 2))
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--output", default="", help="write the figures to this JSON file")
    return parser.parse_args()


def training_inputs(
    layer_type: type[torch.nn.Module], batch_size: int, image_size: int, stem_stride: int
) -> list[tuple[torch.nn.Module, tuple]]:
    """Each `layer_type` layer of the detector, its weights channels-last as in training on a CPU, with the shape
    of its input in a training batch."""
    model, _ = create_model(pretrained="false", pretrained_weights="", stem_stride=stem_stride)
    model = model.to(memory_format=torch.channels_last)
    layers = [module for module in model.modules() if isinstance(module, layer_type)]
    shapes: dict[int, tuple] = {}

    def record(layer, inputs, output):
        shapes[id(layer)] = tuple(inputs[0].shape)

    hooks = [layer.register_forward_hook(record) for layer in layers]
    with torch.no_grad():
        model.eval()(torch.zeros(batch_size, 3, image_size, image_size, dtype=torch.uint8))
    for hook in hooks:
        hook.remove()
    return [(layer, shapes[id(layer)]) for layer in layers]


def random_training_inputs(
    layer_type: type[torch.nn.Module], arguments: argparse.Namespace
) -> Iterator[tuple[torch.nn.Module, torch.Tensor, torch.Generator]]:
    """Each `layer_type` layer with a random channels-last input of its training shape, and the seeded generator
    that drew it (to draw the layer's other tensors). Freed memory is kept for reuse, as in training: otherwise
    each timed call would also pay the page faults of its fresh result tensors, which the pipeline does not."""
    keep_freed_memory_for_reuse()
    generator = torch.Generator().manual_seed(0)
    for layer, shape in training_inputs(layer_type, arguments.batch_size, arguments.image_size, arguments.stem_stride):
        yield layer, torch.randn(shape, generator=generator).contiguous(memory_format=torch.channels_last), generator


def milliseconds(work: Callable[[], object], repeats: int) -> float:
    """Milliseconds a call of `work` takes, averaged over `repeats` calls after one warm-up call."""
    work()
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - started) / repeats * 1000


def table_cells(theirs_ms: float, ours_ms: float | None, ours_in_training: bool) -> tuple[str, str]:
    """Two timings of one layer as Markdown table cells, the one the pipeline trains with in bold; `ours_ms` None
    (not timed at this layer) gives "-"."""
    cells = [f"{theirs_ms:.1f}", "-" if ours_ms is None else f"{ours_ms:.1f}"]
    cells[ours_in_training] = f"**{cells[ours_in_training]}**"
    return cells[0], cells[1]


def finish(arguments: argparse.Namespace, rows: list[dict], totals: dict[str, float], summary: str) -> None:
    """Print the totals' `summary` and, with `--output`, write the arguments, thread count, one row a layer and
    the totals as JSON."""
    print(f"\n{summary}")
    if arguments.output:
        with open(arguments.output, "w") as handle:
            figures = {"arguments": vars(arguments), "threads": torch.get_num_threads(), "layers": rows, **totals}
            json.dump(figures, handle, indent=2)
