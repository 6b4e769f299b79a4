"""A faster backward pass for depthwise convolutions while training on a CPU.

oneDNN's backward pass for depthwise convolutions has two slow paths on this project's CPU
(docs/BENCHMARKS.md, "The depthwise backward pass"). Its weight gradient, for a layer whose kernel is larger
than its input (at 32 px: MobileNetV3-Large's last 5x5 layers, on 4x4 and 2x2 inputs), takes 75-95 ms a batch
of 128 on one core, against 6-8 ms for summing one kernel tap at a time over strided slices of the input; and
its input gradient is mostly slower than a transposed convolution, which computes the same thing (up to 2x at
this network's layers; at one layer 5% faster). `use_cpu_backward` gives a network's depthwise layers that
backward pass: 1.57x the whole training step at 32 px. It applies only while training on a CPU, so evaluation,
ONNX export, Grad-CAM and GPUs run plain `torch.nn.Conv2d`, and the parameters and their state-dict names stay
as they are.

Usage:
    backbone = use_cpu_backward(timm.create_model("mobilenetv3_large_100"))
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


def slices_weight_grad(kernel_size: tuple[int, ...], input_size: tuple[int, ...]) -> bool:
    """Whether the CPU backward pass takes a layer's weight gradient by slices: where its kernel is larger than
    its input (`input_size` ends with height and width), the only layers where slicing beats oneDNN."""
    return max(kernel_size) > min(input_size[-2:])


def depthwise_input_grad(
    input_size: torch.Size,
    weight: torch.Tensor,
    grad_output: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """The gradient of a depthwise convolution's input, as the transposed convolution of the output gradient."""
    output_padding = [
        size - ((out - 1) * step - 2 * pad + kernel)
        for size, out, step, pad, kernel in zip(
            input_size[-2:], grad_output.shape[-2:], stride, padding, weight.shape[-2:], strict=True
        )
    ]
    return F.conv_transpose2d(grad_output, weight, None, stride, padding, output_padding, weight.shape[0])


class _CpuBackwardDepthwise(torch.autograd.Function):
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
            grad_images = depthwise_input_grad(images.shape, weight, grad_output, ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1]:
            if slices_weight_grad(weight.shape[-2:], images.shape):
                sliced = depthwise_weight_grad(images, grad_output, weight.shape[-2:], ctx.stride, ctx.padding)
                # In the weight's own strides, as conv2d_weight gives them: DDP's gradient buckets copy each
                # parameter's strides and warn, at every run, about a gradient with other ones.
                grad_weight = torch.empty_like(weight).copy_(sliced)
            else:
                grad_weight = torch.nn.grad.conv2d_weight(
                    images, weight.shape, grad_output, ctx.stride, ctx.padding, groups=weight.shape[0]
                )
        return grad_images, grad_weight, None, None


class CpuBackwardDepthwiseConv2d(torch.nn.Conv2d):
    """A bias-free depthwise `torch.nn.Conv2d` whose backward pass, while training on a CPU, is
    `depthwise_input_grad` and, for inputs smaller than the kernel, `depthwise_weight_grad`."""

    def _conv_forward(self, images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.training and images.device.type == "cpu":
            return _CpuBackwardDepthwise.apply(images, weight, self.stride, self.padding)
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


def use_cpu_backward(network: torch.nn.Module) -> torch.nn.Module:
    """`network` with each plain depthwise convolution made a `CpuBackwardDepthwiseConv2d`, in place."""
    for module in network.modules():
        if _is_plain_depthwise(module):
            # A subclass adding no state: swapping the class keeps the parameters, hooks and state-dict names
            # (torch.nn.utils.parametrize swaps classes the same way).
            module.__class__ = CpuBackwardDepthwiseConv2d
    return network
