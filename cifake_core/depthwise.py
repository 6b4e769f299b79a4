"""A faster weight gradient for the depthwise convolutions whose kernel is larger than their input, on a CPU.

At 32 px MobileNetV3-Large's last 5x5 depthwise convolutions see 4x4 and 2x2 inputs. For those, oneDNN's weight
gradient takes 220-350 ms a batch of 128 on one core, against 1-25 ms for every other depthwise layer and 3 ms for
their own input gradient: about a third of a whole training step (docs/BENCHMARKS.md, "The depthwise weight
gradient"). Summing one kernel tap at a time over strided slices of the input gives the same gradient in 16-22 ms.
`use_sliced_weight_grad` switches a network's depthwise layers to that gradient; it applies only while training,
on a CPU, to a layer whose kernel is larger than its input, so evaluation, ONNX export and GPUs run plain
`torch.nn.Conv2d`, and the parameters and their state-dict names stay as they are.

Usage:
    backbone = use_sliced_weight_grad(timm.create_model("mobilenetv3_large_100"))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def depthwise_weight_grad(
    images: torch.Tensor,
    grad_output: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """The gradient of a depthwise convolution's (channels, 1, kh, kw) weight: for each kernel tap, the sum over
    the batch and the output positions of the output gradient times the input pixel that tap reads there."""
    (kernel_height, kernel_width), (stride_y, stride_x), (pad_y, pad_x) = kernel_size, stride, padding
    out_height, out_width = grad_output.shape[-2:]
    padded = F.pad(images, (pad_x, pad_x, pad_y, pad_y))
    taps = [
        (
            padded[
                :,
                :,
                dy : dy + stride_y * (out_height - 1) + 1 : stride_y,
                dx : dx + stride_x * (out_width - 1) + 1 : stride_x,
            ]
            * grad_output
        ).sum((0, 2, 3))
        for dy in range(kernel_height)
        for dx in range(kernel_width)
    ]
    return torch.stack(taps, 1).view(-1, 1, kernel_height, kernel_width)


class _SlicedWeightGradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, weight, stride, padding):
        ctx.save_for_backward(images, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(images, weight, None, stride, padding, 1, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output):
        images, weight = ctx.saved_tensors
        grad_images = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_images = torch.nn.grad.conv2d_input(
                images.shape, weight, grad_output, ctx.stride, ctx.padding, groups=weight.shape[0]
            )
        if ctx.needs_input_grad[1]:
            grad_weight = depthwise_weight_grad(images, grad_output, weight.shape[-2:], ctx.stride, ctx.padding)
        return grad_images, grad_weight, None, None


class SlicedWeightGradConv2d(torch.nn.Conv2d):
    """A bias-free depthwise `torch.nn.Conv2d` whose weight gradient, while training on a CPU with an input
    smaller than the kernel, is `depthwise_weight_grad`'s."""

    def _conv_forward(self, images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.training and images.device.type == "cpu" and max(self.kernel_size) > min(images.shape[-2:]):
            return _SlicedWeightGradConv.apply(images, weight, self.stride, self.padding)
        return super()._conv_forward(images, weight, bias)


def _is_plain_depthwise(module: torch.nn.Module) -> bool:
    return (
        type(module) is torch.nn.Conv2d
        and module.groups > 1
        and module.groups == module.in_channels == module.out_channels
        and module.bias is None
        and module.dilation == (1, 1)
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
    )


def use_sliced_weight_grad(network: torch.nn.Module) -> torch.nn.Module:
    """`network` with each plain depthwise convolution made a `SlicedWeightGradConv2d`, in place."""
    for module in network.modules():
        if _is_plain_depthwise(module):
            # A subclass adding no state: swapping the class keeps the parameters, hooks and state-dict names
            # (torch.nn.utils.parametrize swaps classes the same way).
            module.__class__ = SlicedWeightGradConv2d
    return network
