"""1x1 convolutions as matrix products: PyTorch's outputs and gradients, taken that way only while training on a
CPU on small inputs."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from cifake_core import pointwise
from cifake_core.models import create_model
from cifake_core.pointwise import MATMUL_MAX_PIXELS, MatmulPointwiseConv2d, use_matmul_pointwise


def _layers(bias: bool) -> tuple[torch.nn.Conv2d, MatmulPointwiseConv2d]:
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(12, 20, 1, bias=bias)
    fast = use_matmul_pointwise(torch.nn.Sequential(torch.nn.Conv2d(12, 20, 1, bias=bias)))[0]
    fast.load_state_dict(plain.state_dict())
    return plain, fast


def _counting_products(monkeypatch) -> list[int]:
    calls = []
    product = pointwise.matmul_pointwise
    monkeypatch.setattr(pointwise, "matmul_pointwise", lambda *args: calls.append(1) or product(*args))
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("side", [1, 2, 4])
@pytest.mark.parametrize("channels_last", [True, False])
def test_a_training_layer_on_a_small_input_gives_pytorchs_output_and_gradients(
    side: int, bias: bool, channels_last: bool, monkeypatch
):
    calls = _counting_products(monkeypatch)
    plain, fast = _layers(bias)
    images = torch.randn(5, 12, side, side)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    results = []
    for layer in (plain, fast):
        given = images.clone().requires_grad_()
        # The in-place activation checks the output is no view: autograd refuses in-place changes of a custom
        # Function's view outputs.
        output = F.relu_(layer.train()(given))
        (output**2).sum().backward()
        results.append((output, given.grad, *(parameter.grad for parameter in layer.parameters())))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
    assert calls == [1]
    assert results[1][0].is_contiguous(memory_format=torch.channels_last)


def test_larger_inputs_evaluation_and_autocast_run_pytorchs_convolution(monkeypatch):
    calls = _counting_products(monkeypatch)
    _, fast = _layers(bias=True)
    larger = 5  # 25 pixels: above the limit
    assert larger * larger > MATMUL_MAX_PIXELS
    fast.train()(torch.randn(2, 12, larger, larger))
    fast.eval()(torch.randn(2, 12, 2, 2))  # evaluation (Grad-CAM, export) runs PyTorch's own convolution
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast.train()(torch.randn(2, 12, 2, 2)).dtype == torch.bfloat16
    assert calls == []


def test_the_weight_gradient_has_the_channels_last_weights_own_strides():
    # DDP's gradient buckets copy each parameter's strides and warn about a gradient with other ones.
    layer = use_matmul_pointwise(torch.nn.Sequential(torch.nn.Conv2d(12, 20, 1))).to(memory_format=torch.channels_last)
    images = torch.randn(4, 12, 2, 2).contiguous(memory_format=torch.channels_last)
    (layer.train()(images) ** 2).sum().backward()
    weight = layer[0].weight
    assert weight.grad.stride() == weight.stride() == (12, 1, 12, 12)


def test_the_detector_swaps_only_its_1x1_layers_keeps_timms_names_and_trains_to_the_same_gradients(monkeypatch):
    model, _ = create_model(pretrained="false", pretrained_weights="", stem_stride=1)
    swapped = [module for module in model.modules() if isinstance(module, MatmulPointwiseConv2d)]
    ones = [module for module in swapped if module.kernel_size == (1, 1) and module.groups == 1]
    assert len(swapped) == len(ones) == 47  # 30 in the blocks, 16 in their squeeze-excite layers, the head
    plain = timm.create_model("mobilenetv3_large_100", pretrained=False, num_classes=2)
    assert list(model.backbone.state_dict()) == list(plain.state_dict())

    calls = _counting_products(monkeypatch)
    model = model.to(memory_format=torch.channels_last).train()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 0, 1])
    gradients = []
    for limit in (0, MATMUL_MAX_PIXELS):  # 0: every 1x1 layer runs oneDNN's convolution
        monkeypatch.setattr(pointwise, "MATMUL_MAX_PIXELS", limit)
        model.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        gradients.append([parameter.grad.clone() for parameter in model.parameters()])
    assert len(calls) == 35  # the layers on 4x4, 2x2 and 1x1 inputs, in the second pass only
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-4, atol=1e-5)
