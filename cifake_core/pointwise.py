"""1x1 convolutions on small inputs as matrix products while training on a CPU.

At 32 px most of MobileNetV3-Large's 1x1 convolutions see 4x4, 2x2 or 1x1 inputs (the squeeze-excite layers and
the 960 -> 1280 head run on one pixel). There oneDNN's convolution is slow: its forward and backward passes take
up to 4x the time of the same arithmetic done as matrix products over the channels-last pixels (the head 3.4x).
`use_matmul_pointwise` gives a network's 1x1 convolutions that path on inputs of at most `MATMUL_MAX_PIXELS`
pixels, where oneDNN is not faster: 1.12x the whole training step (docs/BENCHMARKS.md, "1x1 convolutions on small
inputs as matrix products"). It applies only while training on a CPU, so evaluation, ONNX export, Grad-CAM and
GPUs run plain `torch.nn.Conv2d`, and the parameters and their state-dict names stay as they are.

Usage:
    backbone = use_matmul_pointwise(timm.create_model("mobilenetv3_large_100"))
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# oneDNN's time over the matrix products', per layer, forward and backward, batch 128, one AVX2 core: 1x1 inputs
# 1.2-4.0x, 2x2 1.28-1.47x, 4x4 0.98-1.30x, 8x8 0.84-1.03x (0.89x all six together), larger 0.36-0.84x. The whole
# step measured the same with the limit at 4 pixels and at 16.
MATMUL_MAX_PIXELS = 16


def _rows(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as an (N*H*W, C) matrix of pixels: a view of a channels-last tensor, a copy of another."""
    return images.permute(0, 2, 3, 1).reshape(-1, images.shape[1])


def _channels_last_product(left: torch.Tensor, right: torch.Tensor, like: torch.Tensor, channels: int) -> torch.Tensor:
    """`left @ right`, whose rows are the pixels of an image batch shaped as `like` with `channels` channels,
    written straight into a channels-last tensor: its own storage, not a view, so in-place activations may follow."""
    shape = (like.shape[0], channels, *like.shape[2:])
    result = torch.empty(shape, dtype=left.dtype, device=left.device, memory_format=torch.channels_last)
    torch.mm(left, right, out=result.permute(0, 2, 3, 1).view(-1, channels))
    return result


class _MatmulPointwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, weight, bias):
        ctx.save_for_backward(images, weight)
        matrix = weight.view(weight.shape[:2])
        output = _channels_last_product(_rows(images), matrix.t(), images, weight.shape[0])
        return output if bias is None else output.add_(bias.view(1, -1, 1, 1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        images, weight = ctx.saved_tensors
        grad_rows = _rows(grad_output)
        grad_images = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_images = _channels_last_product(grad_rows, weight.view(weight.shape[:2]), images, weight.shape[1])
        if ctx.needs_input_grad[1]:
            # In the weight's own strides: DDP's gradient buckets copy each parameter's strides and warn, at
            # every run, about a gradient with other ones. A 1x1 weight's memory is (out, in) in either layout.
            grad_weight = torch.empty_like(weight)
            torch.mm(grad_rows.t(), _rows(images), out=grad_weight.view(weight.shape[:2]))
        if ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_images, grad_weight, grad_bias


def matmul_pointwise(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The 1x1 convolution of `images` by `weight` (out, in, 1, 1) plus `bias`, as matrix products over the pixels,
    forward and backward; channels-last images and output gradients are read without a copy."""
    return _MatmulPointwise.apply(images, weight, bias)


class MatmulPointwiseConv2d(torch.nn.Conv2d):
    """A plain 1x1 `torch.nn.Conv2d` that, while training on a CPU (without autocast) on inputs of at most
    `MATMUL_MAX_PIXELS` pixels, runs forward and backward as matrix products."""

    def _conv_forward(self, images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        small = images.shape[-2] * images.shape[-1] <= MATMUL_MAX_PIXELS
        # Under autocast conv2d would compute in bf16; the matrix products here would not follow it.
        if self.training and images.device.type == "cpu" and small and not torch.is_autocast_enabled("cpu"):
            return matmul_pointwise(images, weight, bias)
        return super()._conv_forward(images, weight, bias)


def _is_plain_pointwise(module: torch.nn.Module) -> bool:
    return (
        type(module) is torch.nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.groups == 1
        and module.dilation == (1, 1)
        and module.padding in ((0, 0), "valid")
    )


def use_matmul_pointwise(network: torch.nn.Module) -> torch.nn.Module:
    """`network` with each plain 1x1 convolution made a `MatmulPointwiseConv2d`, in place."""
    for module in network.modules():
        if _is_plain_pointwise(module):
            # A subclass adding no state: swapping the class keeps the parameters, hooks and state-dict names.
            module.__class__ = MatmulPointwiseConv2d
    return network
