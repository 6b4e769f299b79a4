"""A faster backward pass for depthwise convolutions while training on a CPU.

oneDNN's backward pass for depthwise convolutions has two slow paths on this project's CPU
(docs/BENCHMARKS.md, "The depthwise backward pass"). Its weight gradient, for a layer whose kernel is larger
than its input (at 32 px: MobileNetV3-Large's last 5x5 layers, on 4x4 and 2x2 inputs), takes 90-170 ms a batch
of 128 on one core, against 1-9 ms when every pair of an output and an input pixel is summed over the batch and
added into the kernel tap that joins them (inputs this small have fewer pixels than the kernel has taps); and
its input gradient is mostly slower than a transposed convolution, which computes the same thing (up to 2x at
this network's layers; at one layer 5% faster). `use_cpu_backward` gives a network's depthwise layers that
backward pass: 1.57x the whole training step at 32 px with the stride-1 stem, and the pairs another 1.22x with
the stride-2 stem (docs/BENCHMARKS.md, "The depthwise weight gradient from pixel pairs"). It applies only while
training on a CPU, so evaluation, ONNX export, Grad-CAM and GPUs run plain `torch.nn.Conv2d`, and the parameters
and their state-dict names stay as they are.

Usage:
    backbone = use_cpu_backward(timm.create_model("mobilenetv3_large_100"))
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=64)
def taps_joining_pixels(
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """A (output pixels x input pixels, kernel taps) matrix of ones and zeros: row (o, i) has a one at the tap
    through which output pixel o reads input pixel i, and none where no tap joins them."""
    (kernel_height, kernel_width), (stride_y, stride_x), (pad_y, pad_x) = kernel_size, stride, padding
    out_y, out_x, in_y, in_x = torch.meshgrid(
        *(torch.arange(size) for size in (*output_size, *input_size)), indexing="ij"
    )
    tap_y, tap_x = (in_y - out_y * stride_y + pad_y).flatten(), (in_x - out_x * stride_x + pad_x).flatten()
    joined = (tap_y >= 0) & (tap_y < kernel_height) & (tap_x >= 0) & (tap_x < kernel_width)
    taps = torch.zeros(len(joined), kernel_height * kernel_width)
    taps[joined, (tap_y * kernel_width + tap_x)[joined]] = 1.0
    return taps


def depthwise_weight_grad(
    images: torch.Tensor,
    grad_output: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """The gradient of a depthwise convolution's (channels, 1, kh, kw) weight, from pixel pairs: for every output
    pixel and input pixel, the sum over the batch of the output gradient at the one times the input at the other,
    added into the kernel tap that joins the two (`taps_joining_pixels`). That is fewer products than one tap at a
    time over the padded input wherever the input has fewer pixels than the kernel has taps."""
    batch, channels = images.shape[:2]
    # Channels-last tensors give these (batch, pixels, channels) views without a copy.
    inputs = images.permute(0, 2, 3, 1).reshape(batch, 1, -1, channels)
    gradients = grad_output.permute(0, 2, 3, 1).reshape(batch, -1, 1, channels)
    pair_sums = (gradients * inputs).sum(0).view(-1, channels)
    taps = taps_joining_pixels(
        tuple(images.shape[-2:]), tuple(grad_output.shape[-2:]), tuple(kernel_size), tuple(stride), tuple(padding)
    )
    return (taps.to(pair_sums.dtype).T @ pair_sums).T.reshape(channels, 1, *kernel_size)


def weight_grad_from_pairs(kernel_size: tuple[int, ...], input_size: tuple[int, ...]) -> bool:
    """Whether the CPU backward pass takes a layer's weight gradient from pixel pairs (`depthwise_weight_grad`):
    where its kernel is larger than its input (`input_size` ends with height and width), the only layers where
    that beats oneDNN."""
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
            if weight_grad_from_pairs(weight.shape[-2:], images.shape):
                from_pairs = depthwise_weight_grad(images, grad_output, weight.shape[-2:], ctx.stride, ctx.padding)
                # In the weight's own strides, as conv2d_weight gives them: DDP's gradient buckets copy each
                # parameter's strides and warn, at every run, about a gradient with other ones.
                grad_weight = torch.empty_like(weight).copy_(from_pairs)
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
