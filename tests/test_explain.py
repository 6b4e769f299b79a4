"""Explanations: a Grad-CAM heatmap at the image's size that lights up the region deciding the label, the stage
it is taken from, the PNG overlays of `cifake predict --explain`, and the command itself."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cifake_core import models, tracking
from cifake_core.cli import main
from cifake_core.errors import RegistryError
from cifake_core.explain import MIN_WRITTEN_SIDE, explain_image, target_layer, write_explanations
from cifake_core.onnx_export import export_onnx
from cifake_core.pyfunc_model import INPUT_COLUMN

GREY = (128, 128, 128)
RED = (255, 0, 0)


class _RedPatchBackbone(torch.nn.Module):
    """Calls an image `ai` exactly when it holds enough strongly red pixels: a planted patch decides the label."""

    def __init__(self):
        super().__init__()
        redness = torch.nn.Conv2d(3, 1, kernel_size=1)
        with torch.no_grad():
            redness.weight.copy_(torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1))
            redness.bias.fill_(-0.2)
        self.blocks = torch.nn.Sequential(torch.nn.Sequential(redness, torch.nn.ReLU()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        evidence = self.blocks(images).mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(evidence), 40.0 * evidence - 1.0], dim=1)


def _patch_model() -> models.ImageClassifier:
    # mean 0, std 1: the backbone sees pixels in [0, 1]
    return models.ImageClassifier(_RedPatchBackbone(), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).eval()


def _with_patch(size: tuple[int, int], box: tuple[int, int, int, int] | None) -> Image.Image:
    image = Image.new("RGB", size, GREY)
    if box:
        image.paste(RED, box)
    return image


def _prob_ai(model: torch.nn.Module, image: Image.Image) -> float:
    pixels = torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()).unsqueeze(0)
    with torch.no_grad():
        return float(torch.softmax(model(pixels), dim=1)[0, 1])


@pytest.mark.parametrize("box", [(28, 4, 36, 12), (10, 20, 18, 28)], ids=["top-right", "bottom-left"])
def test_the_heatmap_has_the_image_size_and_lights_up_the_patch_that_decides_the_label(box):
    model = _patch_model()
    image = _with_patch((48, 32), box)  # wider than tall: the model sees the centred 32x32 square, x from 8 to 40
    assert _prob_ai(model, image.crop((8, 0, 40, 32))) > 0.5 > _prob_ai(model, _with_patch((32, 32), None))
    heatmap, overlay = explain_image(model, image, image_size=32)
    assert heatmap.shape == (32, 48) and heatmap.dtype == np.float32 and overlay.size == (48, 32)
    assert 0.0 <= heatmap.min() and heatmap.max() <= 1.0
    left, top, right, bottom = box
    inside = np.zeros(heatmap.shape, dtype=bool)
    inside[top:bottom, left:right] = True
    assert heatmap[inside].mean() > 0.8
    assert heatmap[~inside].mean() < 0.05
    assert heatmap[:, :8].max() == 0 and heatmap[:, 40:].max() == 0  # never seen by the model
    overlay_pixels = np.asarray(overlay, dtype=float)
    assert not np.allclose(overlay_pixels, np.asarray(image, dtype=float))


def test_a_model_with_flip_tta_explains_the_image_as_given():
    image = _with_patch((32, 32), (20, 4, 28, 12))  # right half: its mirror image's patch is on the left
    averaging = _patch_model()
    averaging.flip_tta = True
    heatmap, _ = explain_image(averaging, image, image_size=32)
    np.testing.assert_allclose(heatmap, explain_image(_patch_model(), image, image_size=32)[0], atol=1e-5)
    assert heatmap[4:12, 20:28].mean() > 0.5 > heatmap[:, :12].max()


def test_a_larger_image_is_explained_at_its_own_size():
    heatmap, overlay = explain_image(_patch_model(), _with_patch((128, 128), (0, 0, 32, 32)), image_size=32)
    assert heatmap.shape == (128, 128) and overlay.size == (128, 128)
    assert heatmap[:32, :32].mean() > 0.8 and heatmap[64:, 64:].max() < 0.05


@pytest.fixture(scope="module")
def mobilenet() -> models.ImageClassifier:
    torch.manual_seed(0)
    return models.create_model(pretrained="false", pretrained_weights="", stem_stride=2)[0].eval()


def test_the_stage_is_the_deepest_one_with_a_usable_map(mobilenet):
    blocks = list(mobilenet.backbone.blocks)
    assert target_layer(mobilenet, 224) is blocks[-1]  # 7x7 at 224 px: the last stage, as usual
    assert target_layer(mobilenet, 32) is blocks[2]  # the last stages are 2x2 and 1x1 at 32 px


def test_the_detector_explains_any_image_at_its_size(mobilenet, tmp_path: Path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(path)
    heatmap, overlay = explain_image(mobilenet, path, image_size=32)
    assert heatmap.shape == (40, 60) and overlay.size == (60, 40)
    assert heatmap.max() > 0.5  # normalised per image


def test_a_checkpoint_path_is_enough(mobilenet, tmp_path: Path):
    checkpoint = tmp_path / "best.pt"
    models.save_checkpoint(checkpoint, mobilenet, {"image_size": 32}, epoch=1, metrics={})
    image = _with_patch((32, 32), (0, 0, 8, 8))
    from_path, _ = explain_image(checkpoint, image, image_size=32)
    np.testing.assert_allclose(from_path, explain_image(mobilenet, image, image_size=32)[0], atol=1e-5)


def test_overlays_are_written_once_per_image_with_distinct_names(tmp_path: Path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        _with_patch((32, 32), (0, 0, 8, 8)).save(tmp_path / folder / "1.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    files = [tmp_path / "a" / "1.png", tmp_path / "b" / "1.png", broken]
    written = write_explanations(_patch_model(), files, 32, tmp_path / "out")
    assert [path.name if path else None for path in written] == ["1_gradcam.png", "1_2_gradcam.png", None]
    with Image.open(written[0]) as overlay:
        assert overlay.size == (MIN_WRITTEN_SIDE, MIN_WRITTEN_SIDE)


def test_explain_into_a_file_is_refused_before_anything_is_classified(tmp_path: Path, tracking_store: str, capsys):
    target = tmp_path / "overlays.png"
    target.write_bytes(b"")
    assert main(["predict", str(tmp_path), "--explain", str(target)]) == 2
    assert f"--explain {target} is a file: pass a folder" in capsys.readouterr().err


def test_a_model_without_a_checkpoint_is_a_clear_error(tmp_path: Path, tracking_store: str):
    with pytest.raises(RegistryError, match="cannot find model models:/nothing/1"):
        tracking.download_checkpoint("models:/nothing/1", tmp_path)


@pytest.mark.slow
def test_predict_explain_writes_an_overlay_per_classified_image(mobilenet, tmp_path: Path, tracking_store: str):
    checkpoint, onnx_path, thresholds = tmp_path / "best.pt", tmp_path / "model.onnx", tmp_path / "thresholds.json"
    models.save_checkpoint(checkpoint, mobilenet, {"image_size": 32}, epoch=1, metrics={})
    export_onnx(mobilenet, 32, onnx_path, np.zeros((2, 3, 32, 32), dtype=np.uint8))
    thresholds.write_text(json.dumps({"default": "0.5", "thresholds": {"0.5": {"value": 0.5}}}))
    with tracking.tracked_run("cifake", "explain") as run_id:
        tracking.log_artifact(checkpoint, "checkpoint")
        png = io.BytesIO()
        _with_patch((32, 32), None).save(png, format="PNG")
        example = pd.DataFrame({INPUT_COLUMN: [base64.b64encode(png.getvalue()).decode()]})
        model_uri = tracking.log_pyfunc_model(onnx_path, thresholds, example)
    photos = tmp_path / "photos"
    photos.mkdir()
    _with_patch((32, 32), (0, 0, 8, 8)).save(photos / "red.png")
    _with_patch((32, 32), (0, 0, 8, 8)).save(photos / "caf\udce9.png", format="PNG")  # a name in Latin-1 bytes
    (photos / "broken.jpg").write_bytes(b"nope")
    results, overlays = tmp_path / "results.csv", tmp_path / "overlays"
    assert (
        main(["predict", str(photos), "--model_uri", model_uri, "--output", str(results), "--explain", str(overlays)])
        == 1
    )
    table = pd.read_csv(results, keep_default_na=False).set_index("path")
    assert table.loc[str(photos / "red.png"), "explanation"] == str(overlays / "red_gradcam.png")
    assert table.loc[str(photos / "caf\\xe9.png"), "explanation"] == str(overlays / "caf\\xe9_gradcam.png")
    assert table.loc[str(photos / "broken.jpg"), "explanation"] == ""
    assert sorted(p.name for p in overlays.iterdir()) == ["caf\\xe9_gradcam.png", "red_gradcam.png"]
    assert tracking.download_checkpoint(f"runs:/{run_id}/model", tmp_path / "again").name == "best.pt"
