"""The detector network: timm's MobileNetV3-Large behind a normalisation layer, and its checkpoints.

The network takes the uint8 images that `preprocessing` produces and normalises them itself, so the exported
ONNX graph holds the normalisation too. ImageNet weights come from the Hugging Face hub (`pretrained`:
auto tries and falls back to random initialisation within seconds offline, true insists, false skips) or
from a local file (`pretrained_weights`). Checkpoints are self-describing: weights, config, epoch, metric.

Usage:
    model, weights_source = create_model(pretrained="auto", pretrained_weights="", stem_stride=1, flip_tta=True)
    logits = model.eval()(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))  # (4, 2): each image and its mirror
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from cifake_core import CLASS_NAMES
from cifake_core.depthwise import use_cpu_backward
from cifake_core.errors import PretrainedWeightsError
from cifake_core.files import atomic_path
from cifake_core.network import host_reachable
from cifake_core.pointwise import use_matmul_pointwise

ARCHITECTURE = "mobilenetv3_large_100"
# torchvision's initialisation of MobileNetV3's classifier: starting logits near 0 (loss ln 2).
HEAD_INIT_STD = 0.01
# The stride of MobileNetV3's first convolution as timm builds it (and ImageNet weights were trained with).
TIMM_STEM_STRIDE = 2
_HUB_HOST = "huggingface.co"
log = logging.getLogger(__name__)


class ImageClassifier(torch.nn.Module):
    """uint8 (or 0-255 float) NCHW images in, class logits out; normalisation is part of the graph. With
    `flip_tta`, an evaluating model (not a training one) returns the mean of each image's logits and its mirror
    image's: training flips images at random, so both views are ones the network has learnt."""

    def __init__(
        self, backbone: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...], flip_tta: bool = False
    ):
        super().__init__()
        self.backbone = backbone
        self.flip_tta = flip_tta
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", -torch.tensor(mean).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        normalised = images.float() * self.scale + self.shift
        if self.training or not self.flip_tta:
            return self.backbone(normalised)
        # One pass over both views; unflatten, not chunk, keeps the exported graph's batch dimension dynamic.
        both = self.backbone(torch.cat([normalised, normalised.flip(-1)]))
        return both.unflatten(0, (2, -1)).mean(0)


@contextlib.contextmanager
def single_view(model: ImageClassifier):
    """Inside the block `model` scores each image alone, without its mirror image: half the cost of `flip_tta`,
    for judging epochs; the model is restored on leaving."""
    flip_tta, model.flip_tta = model.flip_tta, False
    try:
        yield model
    finally:
        model.flip_tta = flip_tta


@contextlib.contextmanager
def _hub_cache_only(enabled: bool):
    """Let huggingface_hub use its local cache only, instead of retrying an unreachable host for a minute.

    The hub reads HF_HUB_OFFLINE once at import, so its constant is switched rather than the variable.
    """
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = previous or enabled
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _hub_backbone(offline: bool) -> torch.nn.Module:
    with _hub_cache_only(offline):
        return timm.create_model(ARCHITECTURE, pretrained=True, num_classes=len(CLASS_NAMES))


def _backbone(pretrained: str, pretrained_weights: str) -> tuple[torch.nn.Module, str]:
    """The timm network and a description of where its starting weights came from."""
    if pretrained_weights:
        path = Path(pretrained_weights).expanduser()
        try:
            overlay = {"file": str(path), "num_classes": 1000}
            model = timm.create_model(
                ARCHITECTURE, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=len(CLASS_NAMES)
            )
        except Exception as error:
            raise PretrainedWeightsError(
                f"could not load pretrained_weights {str(path)!r} into {ARCHITECTURE}: {error}. "
                f"Pass a timm {ARCHITECTURE} ImageNet checkpoint (.pth or .safetensors)."
            ) from error
        return model, f"file:{path.name}"
    if pretrained == "false":
        return timm.create_model(ARCHITECTURE, pretrained=False, num_classes=len(CLASS_NAMES)), "random"
    offline = not host_reachable(_HUB_HOST)
    try:
        return _hub_backbone(offline), f"hub:timm/{ARCHITECTURE}"
    except Exception as error:
        where = f"{_HUB_HOST} is unreachable and they are not in the local cache" if offline else "the download failed"
        reason = f"no ImageNet weights for {ARCHITECTURE}: {where} ({type(error).__name__}: {str(error)[:200]})"
        if pretrained == "true":
            raise PretrainedWeightsError(
                f"{reason}. Go online once, or pass pretrained_weights=PATH to a downloaded file, or train from "
                "scratch with pretrained=false."
            ) from error
        log.warning("%s: starting from random weights (pretrained=auto).", reason)
        return timm.create_model(ARCHITECTURE, pretrained=False, num_classes=len(CLASS_NAMES)), "random"


def set_stem_stride(backbone: torch.nn.Module, stem_stride: int) -> torch.nn.Module:
    """`backbone` with its first convolution's stride set to `stem_stride`, in place."""
    # At 32 px timm's stride-2 stem halves CIFAKE's pixels before any feature is learnt; stride 1 keeps the
    # weights' shapes (pretrained weights still load) and quadruples every later activation.
    backbone.conv_stem.stride = (stem_stride, stem_stride)
    return backbone


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """An evaluating copy of `model` with each BatchNorm folded into the convolution it follows, its activation
    kept: the same logits within float rounding, and 1.2x the images/s of eager evaluation on a CPU
    (docs/BENCHMARKS.md, "BatchNorm folded into the convolutions for evaluation"). `model` is left as it was.
    A pair is folded when the BatchNorm is the convolution's next sibling with its channel count: timm's
    MobileNetV3 defines every BatchNorm right after the convolution it normalises (tests check the logits)."""
    folded = copy.deepcopy(model).eval()
    for parent in list(folded.modules()):
        for (conv_name, conv), (norm_name, norm) in itertools.pairwise(list(parent.named_children())):
            if (
                isinstance(conv, torch.nn.Conv2d)
                and isinstance(norm, torch.nn.BatchNorm2d)
                and norm.track_running_stats
                and conv.out_channels == norm.num_features
            ):
                setattr(parent, conv_name, torch.nn.utils.fuse_conv_bn_eval(conv, norm))
                # timm's BatchNormAct2d applies dropout and its activation after normalising; both stay.
                after = [getattr(norm, part) for part in ("drop", "act") if hasattr(norm, part)]
                setattr(parent, norm_name, torch.nn.Sequential(*after))
    return folded


def _init_head(backbone: torch.nn.Module) -> torch.nn.Module:
    # timm draws MobileNetV3's classifier from +-1/sqrt(classes), TensorFlow's rule sized for ImageNet's 1,000;
    # with our 2 classes that is +-0.71, logits of +-3 before any training and gradient norms of ~100 in the
    # first steps (docs/BENCHMARKS.md, "Fourth round: the classifier's initialisation"). The head is new whatever the
    # starting weights (ImageNet's has 1,000 classes), so it is always re-drawn.
    head = backbone.get_classifier()
    with torch.no_grad():
        head.weight.normal_(0.0, HEAD_INIT_STD)
        head.bias.zero_()
    return backbone


def create_model(
    pretrained: str, pretrained_weights: str, stem_stride: int, flip_tta: bool = False
) -> tuple[ImageClassifier, str]:
    """The detector, and where its starting weights came from (`random`, `hub:...`, `file:...`)."""
    backbone, weights_source = _backbone(pretrained, pretrained_weights)
    backbone = use_matmul_pointwise(use_cpu_backward(_init_head(set_stem_stride(backbone, stem_stride))))
    return ImageClassifier(backbone, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, flip_tta), weights_source


def save_checkpoint(path: Path, model: ImageClassifier, config: dict[str, Any], epoch: int, metrics: dict) -> None:
    """Everything needed to rebuild and judge the model: weights, flat config, epoch and metrics."""
    with atomic_path(path) as temporary:
        torch.save(
            {
                "architecture": ARCHITECTURE,
                "state_dict": model.state_dict(),
                "config": config,
                "epoch": epoch,
                "metrics": metrics,
            },
            temporary,
        )


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[ImageClassifier, dict[str, Any]]:
    """A model rebuilt from a checkpoint written by `save_checkpoint`, and the checkpoint's metadata."""
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    backbone = timm.create_model(checkpoint["architecture"], pretrained=False, num_classes=len(CLASS_NAMES))
    # Checkpoints written before `stem_stride` existed were trained with timm's stride 2.
    backbone = set_stem_stride(backbone, checkpoint["config"].get("stem_stride", TIMM_STEM_STRIDE))
    # Checkpoints written before `flip_tta` existed were evaluated and exported without it.
    flip_tta = checkpoint["config"].get("flip_tta", "false") == "true"
    model = ImageClassifier(backbone, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, flip_tta)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), {key: value for key, value in checkpoint.items() if key != "state_dict"}
