"""The depthwise layers' CPU backward pass: PyTorch's gradients, taken the faster way only while training on a CPU."""

from __future__ import annotations

import pytest
import timm
import torch

from cifake_core import depthwise
from cifake_core.depthwise import (
    CpuBackwardDepthwiseConv2d,
    depthwise_input_grad,
    depthwise_weight_grad,
    use_cpu_backward,
)
from cifake_core.models import create_model

# (input side, kernel, stride): inputs smaller than the kernel, the stride-2 layers at even and odd sides.
SHAPES = [(2, 5, 1), (4, 5, 2), (5, 5, 2), (8, 3, 1), (8, 3, 2), (7, 3, 2)]


def _tensors(size: int, kernel: int, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(size * kernel * stride)
    images = torch.randn(6, 10, size, size, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(10, 1, kernel, kernel, generator=generator)
    output = torch.nn.functional.conv2d(images, weight, None, stride, kernel // 2, 1, 10)
    return images, weight, torch.randn(output.shape, generator=generator)


@pytest.mark.parametrize(("size", "kernel", "stride"), SHAPES)
def test_both_gradients_equal_pytorchs(size: int, kernel: int, stride: int):
    images, weight, grad_output = _tensors(size, kernel, stride)
    layout = ((stride, stride), (kernel // 2, kernel // 2))
    torch.testing.assert_close(
        depthwise_input_grad(images.shape, weight, grad_output, *layout),
        torch.nn.grad.conv2d_input(images.shape, weight, grad_output, *layout, groups=10),
        rtol=1e-4,
        atol=1e-4,
    )
    torch.testing.assert_close(
        depthwise_weight_grad(images, grad_output, (kernel, kernel), *layout),
        torch.nn.grad.conv2d_weight(images, weight.shape, grad_output, *layout, groups=10),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize(("size", "stride"), [(2, 1), (4, 2), (16, 1), (15, 2)])
def test_a_training_layer_gets_pytorchs_gradients_and_uses_pairs_only_for_inputs_smaller_than_its_kernel(
    size: int, stride: int, monkeypatch
):
    calls = {"input": 0, "pairs": 0}

    def counted(name, function):
        return lambda *args: calls.__setitem__(name, calls[name] + 1) or function(*args)

    monkeypatch.setattr(depthwise, "depthwise_input_grad", counted("input", depthwise_input_grad))
    monkeypatch.setattr(depthwise, "depthwise_weight_grad", counted("pairs", depthwise_weight_grad))
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(8, 8, 5, stride, 2, groups=8, bias=False)
    fast = use_cpu_backward(torch.nn.Sequential(torch.nn.Conv2d(8, 8, 5, stride, 2, groups=8, bias=False)))[0]
    fast.weight.data.copy_(plain.weight.data)
    assert isinstance(fast, CpuBackwardDepthwiseConv2d)
    images = torch.randn(4, 8, size, size)
    gradients = []
    for layer in (plain, fast):
        given = images.clone().requires_grad_()
        (layer.train()(given) ** 2).sum().backward()
        gradients.append((given.grad, layer.weight.grad))
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-4)
    expected = {"input": 1, "pairs": 1 if size < 5 else 0}
    assert calls == expected
    given = images.clone().requires_grad_()
    (fast.eval()(given) ** 2).sum().backward()  # evaluation (Grad-CAM, export) runs PyTorch's own convolution
    assert calls == expected


@pytest.mark.parametrize("size", [2, 16], ids=["pairs", "conv2d_weight"])
def test_the_weight_gradient_has_the_channels_last_weights_own_strides(size: int):
    # DDP's gradient buckets copy each parameter's strides and warn about a gradient with other ones.
    layer = use_cpu_backward(torch.nn.Sequential(torch.nn.Conv2d(8, 8, 5, 1, 2, groups=8, bias=False)))
    layer = layer.to(memory_format=torch.channels_last)
    images = torch.randn(4, 8, size, size).contiguous(memory_format=torch.channels_last)
    (layer.train()(images) ** 2).sum().backward()
    weight = layer[0].weight
    assert weight.stride() == (25, 1, 5, 1)
    assert weight.grad.stride() == weight.stride()


def test_the_detector_swaps_only_its_depthwise_layers_and_keeps_timms_parameter_names():
    model, _ = create_model(pretrained="false", pretrained_weights="", stem_stride=1)
    swapped = [module for module in model.modules() if isinstance(module, CpuBackwardDepthwiseConv2d)]
    assert len(swapped) == 15 and all(layer.groups == layer.in_channels for layer in swapped)
    plain = timm.create_model("mobilenetv3_large_100", pretrained=False, num_classes=2)
    assert list(model.backbone.state_dict()) == list(plain.state_dict())
