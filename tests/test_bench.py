"""The premises of the benchmarks: bench/memory.py's repeated dataset survives deduplication with the original's
pixels; bench/first_steps.py's two heads start where it says; bench/tta.py averages each image's logits over
its mirror image and over shifts that match training's `translate`; bench/depthwise.py, bench/pointwise.py and
bench/batchnorm.py time each depthwise, 1x1 and normalisation layer at the input it gets in training;
bench/training_step.py computes the products in bfloat16 for its one variant that says so and profiles the
pipeline's step; bench/muon.py orthogonalises the channel-mixing convolutions' updates and leaves the rest to
AdamW."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.layers import BatchNormAct2d

from cifake_core.config import TrainConfig
from cifake_core.data import load_split_arrays, prepare_splits
from cifake_core.depthwise import CpuBackwardDepthwiseConv2d
from cifake_core.engine import random_translate
from cifake_core.models import ImageClassifier, create_model
from cifake_core.pointwise import MatmulPointwiseConv2d, matmul_pointwise

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prepare(root: Path):
    return prepare_splits(root, val_fraction=0.25, max_train_per_class=0, max_test_per_class=0, seed=0, num_workers=1)


def test_repeated_dataset_keeps_every_copy_with_the_same_pixels(
    make_dataset: Callable[..., Path], tmp_path: Path
) -> None:
    memory = _bench_module("memory")
    original = _prepare(make_dataset(train=8, test=3))
    repeated = _prepare(memory.build_copies(original.root, tmp_path / "x3", copies=3))

    assert len(repeated.manifest) == 3 * len(original.manifest)
    assert sum(repeated.summary["duplicates"].values()) == 0
    images, _ = load_split_arrays(repeated, "test", 32, num_workers=1)
    copies = repeated.manifest[repeated.manifest.split == "test"].path.str.replace(r"\.copy\d", "", regex=True)
    original_images, _ = load_split_arrays(original, "test", 32, num_workers=1)
    by_path = dict(zip(original.manifest[original.manifest.split == "test"].path, original_images, strict=True))
    for path, image in zip(copies, images, strict=True):
        np.testing.assert_array_equal(image, by_path[path])


def test_an_interrupted_build_is_rebuilt_and_a_finished_one_reused(
    make_dataset: Callable[..., Path], tmp_path: Path
) -> None:
    memory = _bench_module("memory")
    source = make_dataset(train=4, test=2)
    destination = tmp_path / "x2"
    (destination / "train" / "FAKE").mkdir(parents=True)
    (destination / "train" / "FAKE" / "half-written.jpg").write_bytes(b"")

    memory.build_copies(source, destination, copies=2)
    assert not (destination / "train" / "FAKE" / "half-written.jpg").exists()
    built = sorted(path.stat().st_mtime_ns for path in destination.rglob("*.jpg"))
    memory.build_copies(source, destination, copies=2)
    assert sorted(path.stat().st_mtime_ns for path in destination.rglob("*.jpg")) == built
    assert len(list(destination.rglob("*.jpg"))) == 2 * len(list(source.rglob("*.jpg")))


def test_first_steps_start_at_chance_with_our_head_and_far_from_it_with_timms() -> None:
    first_steps = _bench_module("first_steps").first_steps
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 2, (256,), generator=generator)
    first = {head: first_steps(head, images, labels, TrainConfig(), 1, 1, 0)[0] for head in ("timm", "ours")}
    assert first["ours"]["loss"] == pytest.approx(math.log(2), abs=0.05)
    assert first["timm"]["mean_abs_logit"] > 10 * first["ours"]["mean_abs_logit"]
    assert first["timm"]["gradient_norm"] > 10 * first["ours"]["gradient_norm"]


class _LeftMinusRight(torch.nn.Module):
    """Logit of class 1 = left half's mean minus right half's: a mirror image gets the opposite logit."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        half = images.shape[-1] // 2
        score = images[..., :half].float().mean((1, 2, 3)) - images[..., half:].float().mean((1, 2, 3))
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_tta_averages_each_image_with_its_mirror() -> None:
    split_figures = _bench_module("tta").split_figures
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = (images[..., :4].float().mean((1, 2, 3)) > images[..., 4:].float().mean((1, 2, 3))).long()
    model = ImageClassifier(_LeftMinusRight(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), flip_tta=True).eval()
    figures = split_figures(model, images, labels, torch.device("cpu"), max_shift=1)["sets"]
    assert figures["plain"]["auc"] == 1.0
    assert figures["flip"]["auc"] == 0.5  # image and mirror cancel: every averaged logit is 0
    assert [figures[name]["views"] for name in ("plain", "flip", "shift1")] == [1, 2, 10]
    assert model.flip_tta  # the model's own setting is back


def test_tta_shifts_are_the_translations_training_draws() -> None:
    tta = _bench_module("tta")
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    translated = random_translate(images, 2, torch.Generator().manual_seed(2))
    shifts = torch.randint(-2, 3, (32, 2), generator=torch.Generator().manual_seed(2))  # the draw random_translate made
    assert shifts.abs().sum(1).gt(1).any()  # the draw includes diagonal and two-pixel shifts
    for image, (dy, dx), expected in zip(images, shifts.tolist(), translated, strict=True):
        torch.testing.assert_close(tta.shifted(image[None], dy, dx)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize(("stem_stride", "last_side"), [(1, 2), (2, 1)])
def test_depthwise_bench_records_each_layers_training_input(stem_stride: int, last_side: int) -> None:
    layers = _bench_module("layers").training_inputs(
        CpuBackwardDepthwiseConv2d, batch_size=3, image_size=32, stem_stride=stem_stride
    )
    assert len(layers) == 15
    assert layers[0][1] == (3, 16, 32 // stem_stride, 32 // stem_stride)
    assert layers[-1][1] == (3, 960, last_side, last_side)


def test_pointwise_bench_records_each_1x1_layers_training_input_and_times_the_pipelines_path() -> None:
    layers = _bench_module("layers").training_inputs(MatmulPointwiseConv2d, batch_size=3, image_size=32, stem_stride=1)
    assert len(layers) == 47
    assert layers[1][1] == (3, 16, 32, 32)  # blocks.1's expansion: the largest input, left to oneDNN
    assert layers[-1][1] == (3, 960, 1, 1)  # the head
    layer, shape = layers[-1]
    images, grad_output = torch.randn(shape), torch.randn(3, layer.out_channels, 1, 1)
    forward_backward = _bench_module("pointwise").forward_backward
    results = [
        forward_backward(convolution, images, layer.weight, layer.bias, grad_output)
        for convolution in (torch.nn.functional.conv2d, matmul_pointwise)
    ]
    assert len(results[0]) == 4  # the output and the input, weight and bias gradients
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)


def test_batchnorm_bench_records_each_normalisation_layers_training_input_and_starts_each_pass_afresh() -> None:
    layers = _bench_module("layers").training_inputs(BatchNormAct2d, batch_size=3, image_size=32, stem_stride=1)
    assert len(layers) == 46
    assert layers[0][1] == (3, 16, 32, 32)  # the stem's, at stride 1
    assert layers[-1][1] == (3, 960, 2, 2)
    layer, shape = layers[3]
    images, grad_output = torch.randn(shape), torch.randn(shape)
    forward_backward = _bench_module("batchnorm").forward_backward
    first, second = (
        [tensor.clone() for tensor in forward_backward(layer.train(), images, grad_output)] for _ in range(2)
    )
    assert len(first) == 4  # the output and the input, scale and shift gradients
    assert first[2].abs().sum() > 0  # the scale gets a gradient
    torch.testing.assert_close(second, first)  # gradients are not summed across timed calls


def test_training_step_bench_sets_bfloat16_products_for_its_variant_alone_and_profiles_the_step() -> None:
    bench = _bench_module("training_step")
    images, labels = bench._images(4, 32, torch.device("cpu"))
    precision = torch.backends.mkldnn.matmul.fp32_precision
    try:
        bench.step_images_per_second(bench.BFLOAT16_PRODUCTS, images, labels, 2, 1, 0, torch.device("cpu"), 1)
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        table = bench.profile_table(images, labels, 2, 1, torch.device("cpu"), 1)
        assert torch.backends.mkldnn.matmul.fp32_precision == precision  # the pipeline's step, as the pipeline runs it
        assert "Self CPU" in table and "aten::mm" in table  # the 1x1 layers on small inputs are matrix products
    finally:  # a process-wide setting: the tests after this one run at the process's own
        torch.backends.mkldnn.matmul.fp32_precision = precision


def test_muon_orthogonalises_an_update_whatever_its_shape() -> None:
    orthogonalised = _bench_module("muon").orthogonalised
    for shape in [(64, 32), (32, 288), (160, 960)]:
        # Singular values spread from 0.1 to 1: left vectors x diag x right vectors.
        generator = torch.Generator().manual_seed(0)
        left, right = (torch.linalg.qr(torch.randn(side, min(shape), generator=generator))[0] for side in shape)
        update = left @ torch.diag(torch.logspace(-1, 0, min(shape))) @ right.T
        after = torch.linalg.svdvals(orthogonalised(update))
        assert 0.6 < after.min() and after.max() < 1.3, shape


def test_muon_takes_the_channel_mixing_convolutions_and_adamw_the_rest() -> None:
    muon = _bench_module("muon")
    model, _ = create_model("false", "", stem_stride=1)
    optimizer = muon.MuonAdamW(model, lr=0.004, weight_decay=0.05)
    by_muon = {id(parameter) for parameter in optimizer.param_groups[0]["params"]}
    for group in optimizer.param_groups:
        assert {parameter.ndim > 1 for parameter in group["params"]} == {group["weight_decay"] > 0}
    taken = {name for name, parameter in model.named_parameters() if id(parameter) in by_muon}
    assert "backbone.blocks.1.0.conv_pw.weight" in taken and "backbone.blocks.5.2.se.conv_reduce.weight" in taken
    for name in taken:
        assert name.endswith("weight") and "conv_dw" not in name and "bn" not in name, name
    kept = {name for name, _ in model.named_parameters()} - taken
    assert {"backbone.conv_stem.weight", "backbone.conv_head.weight", "backbone.classifier.weight"} <= kept
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    before = {name: parameter.clone() for name, parameter in model.named_parameters()}
    torch.nn.functional.cross_entropy(model(images), torch.tensor([0, 1, 0, 1])).backward()
    optimizer.step()
    assert all(not torch.equal(before[name], parameter) for name, parameter in model.named_parameters())
