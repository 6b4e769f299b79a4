"""Explanations: which regions of an image drove its score, as a Grad-CAM heatmap and an overlay.

Grad-CAM (the `grad-cam` package) weighs a convolutional stage's feature maps by the gradient of the `ai`
log-odds (logit ai - logit real, of which prob_ai is a function) and keeps the positive part: the map shows
where the evidence for `ai` is. The stage is the deepest one of the backbone (`backbone.blocks`, timm's
MobileNetV3 stages) whose feature map is at least MIN_CAM_SIDE pixels across at the model's input size.
At 224 px that is the last stage (7x7), the textbook choice; at CIFAKE's 32 px the last stages are 1x1 and
2x2, which would paint every image in one colour, so the 4x4 stage is used.

The map is computed on what the model sees (the centred square, resized to image_size) and placed back
over that square at the image's own size; outside it (in a non-square image) it is 0, since the model never
saw those pixels. A model with `flip_tta` scores an image and its mirror image together; the map is the
given image's (the first of the two views), so it lines up with the picture shown. It is normalised per
image to [0, 1], so it says where, not how much: read it beside prob_ai. The temperature of the served
model does not change it (it scales every gradient alike), so the run's PyTorch checkpoint explains the
calibrated model too. Needs torch: serving stays torch-free, and this module is used by `cifake predict
--explain` and the dashboard with the checkpoint each run logs (`checkpoint/best.pt`).

Usage:
    heatmap, overlay = explain_image(Path("best.pt"), "photo.jpg", image_size=32)  # or a loaded model
    written = write_explanations(model, [Path("photo.jpg")], 32, Path("out"))       # [out/photo_gradcam.png]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image

from cifake_core.errors import ImageError
from cifake_core.files import printable_name
from cifake_core.models import load_checkpoint
from cifake_core.preprocessing import ImageSource, centre_square, load_rgb, to_model_array

MIN_CAM_SIDE = 4
IMAGE_WEIGHT = 0.5  # overlay = 0.5 image + 0.5 colour-mapped heatmap
# Written overlays of small images (CIFAKE's are 32 px) are enlarged, pixels kept square, to be seen at all.
MIN_WRITTEN_SIDE = 256
SUFFIX = "_gradcam.png"


class _AiLogOdds:
    """Grad-CAM target: the `ai` log-odds of one image's logits."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[..., 1] - logits[..., 0]


def target_layer(model: torch.nn.Module, image_size: int) -> torch.nn.Module:
    """The deepest stage of `model.backbone.blocks` whose output is at least MIN_CAM_SIDE pixels across."""
    stages = list(model.backbone.blocks)
    sides: dict[int, int] = {}
    hooks = [
        stage.register_forward_hook(lambda module, inputs, output, i=i: sides.__setitem__(i, min(output.shape[-2:])))
        for i, stage in enumerate(stages)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    wide_enough = [i for i in range(len(stages)) if sides[i] >= MIN_CAM_SIDE]
    return stages[wide_enough[-1] if wide_enough else 0]


def _as_model(model: torch.nn.Module | str | Path) -> torch.nn.Module:
    return load_checkpoint(Path(model))[0] if isinstance(model, (str, Path)) else model.eval()


def explain_image(
    model: torch.nn.Module | str | Path, source: ImageSource, image_size: int
) -> tuple[np.ndarray, Image.Image]:
    """Grad-CAM of one image: a float32 (H, W) heatmap in [0, 1] at the image's own size, and the image with the
    heatmap overlaid. `model` is a loaded detector or a checkpoint path (pass a loaded one for many images)."""
    model = _as_model(model)
    image = load_rgb(source)
    device = next(model.parameters()).device
    view = torch.from_numpy(to_model_array(image, image_size)).unsqueeze(0).float().to(device)
    cam = GradCAM(model=model, target_layers=[target_layer(model, image_size)])
    try:
        # The library's own context manager swallows IndexError, so its hooks are released here instead.
        with torch.enable_grad():
            view_map = cam(input_tensor=view, targets=[_AiLogOdds()])[0]
    finally:
        cam.activations_and_grads.release()
    left, top, side = centre_square(*image.size)
    square = np.asarray(Image.fromarray(view_map.astype(np.float32)).resize((side, side), Image.Resampling.BILINEAR))
    heatmap = np.zeros((image.height, image.width), dtype=np.float32)
    heatmap[top : top + side, left : left + side] = np.clip(square, 0.0, 1.0)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    overlay = Image.fromarray(show_cam_on_image(pixels, heatmap, use_rgb=True, image_weight=IMAGE_WEIGHT))
    return heatmap, overlay


def _enlarged(image: Image.Image) -> Image.Image:
    factor = math.ceil(MIN_WRITTEN_SIDE / min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def write_explanations(
    model: torch.nn.Module | str | Path, files: Sequence[Path], image_size: int, folder: Path
) -> list[Path | None]:
    """One `<name>_gradcam.png` overlay per file in `folder` (`<name>_2_gradcam.png` when two files share a name),
    enlarged to at least MIN_WRITTEN_SIDE pixels; None for a file that cannot be decoded."""
    model = _as_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    written: list[Path | None] = []
    for path in files:
        try:
            _, overlay = explain_image(model, path, image_size)
        except ImageError:
            written.append(None)
            continue
        stem = printable_name(path.stem)
        name, copy = stem, 1
        while name in used:
            copy += 1
            name = f"{stem}_{copy}"
        used.add(name)
        target = folder / f"{name}{SUFFIX}"
        _enlarged(overlay).save(target)
        written.append(target)
    return written
