"""The sliced depthwise weight gradient: the same gradients as PyTorch's convolution, taken only where it pays."""

from __future__ import annotations

import pytest
import timm
import torch

from cifake_core import depthwise
from cifake_core.depthwise import SlicedWeightGradConv2d, depthwise_weight_grad, use_sliced_weight_grad
from cifake_core.models import create_model


@pytest.mark.parametrize(
    ("size", "kernel", "stride"),
    [(2, 5, 1), (4, 5, 2), (5, 5, 2), (8, 3, 1), (7, 3, 2)],
)
def test_depthwise_weight_grad_equals_pytorchs(size: int, kernel: int, stride: int):
    generator = torch.Generator().manual_seed(size * kernel)
    images = torch.randn(6, 10, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(10, 1, kernel, kernel, generator=generator)
    padding = (kernel // 2, kernel // 2)
    output = torch.nn.functional.conv2d(images, weight, None, stride, padding, 1, 10)
    grad_output = torch.randn(output.shape, generator=generator)
    expected = torch.nn.grad.conv2d_weight(images, weight.shape, grad_output, stride, padding, groups=10)
    got = depthwise_weight_grad(images, grad_output, (kernel, kernel), (stride, stride), padding)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def _layer_and_copy(kernel: int, stride: int) -> tuple[torch.nn.Conv2d, torch.nn.Conv2d]:
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(8, 8, kernel, stride, kernel // 2, groups=8, bias=False)
    sliced = use_sliced_weight_grad(
        torch.nn.Sequential(torch.nn.Conv2d(8, 8, kernel, stride, kernel // 2, groups=8, bias=False))
    )
    sliced[0].weight.data.copy_(plain.weight.data)
    return plain, sliced[0]


@pytest.mark.parametrize(("size", "stride"), [(2, 1), (4, 2), (16, 1)])
def test_a_training_layer_gets_pytorchs_gradients_and_slices_only_inputs_smaller_than_its_kernel(
    size: int, stride: int, monkeypatch
):
    calls = []
    monkeypatch.setattr(
        depthwise, "depthwise_weight_grad", lambda *args: calls.append(1) or depthwise_weight_grad(*args)
    )
    plain, sliced = _layer_and_copy(5, stride)
    assert isinstance(sliced, SlicedWeightGradConv2d)
    images = torch.randn(4, 8, size, size)
    gradients = []
    for layer in (plain, sliced):
        given = images.clone().requires_grad_()
        (layer.train()(given) ** 2).sum().backward()
        gradients.append((given.grad, layer.weight.grad))
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-4)
    assert len(calls) == (1 if size < 5 else 0)
    given = images.clone().requires_grad_()
    (sliced.eval()(given) ** 2).sum().backward()  # evaluation (Grad-CAM, export) runs PyTorch's own convolution
    assert len(calls) == (1 if size < 5 else 0)


def test_the_detector_swaps_only_its_depthwise_layers_and_keeps_timms_parameter_names():
    model, _ = create_model(pretrained="false", pretrained_weights="", stem_stride=1)
    swapped = [module for module in model.modules() if isinstance(module, SlicedWeightGradConv2d)]
    assert len(swapped) == 15 and all(layer.groups == layer.in_channels for layer in swapped)
    plain = timm.create_model("mobilenetv3_large_100", pretrained=False, num_classes=2)
    assert list(model.backbone.state_dict()) == list(plain.state_dict())
