"""The robustness report: each perturbation does what it says and is deterministic; the report scores every set
under every perturbation, names its metrics as documented, and is logged; eval_dirs are validated once."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image, ImageFilter

from cifake_core import data, pipeline, tracking
from cifake_core.config import load_config
from cifake_core.engine import degrade, random_translate, train_one_epoch
from cifake_core.errors import ConfigError, DatasetError
from cifake_core.models import create_model
from cifake_core.preprocessing import to_model_array
from cifake_core.robustness import (
    PERTURBATIONS,
    VARIANTS,
    labelled_images,
    robustness_report,
    sample,
    variants,
)

BY_NAME = {p.name: p for p in PERTURBATIONS}


def _photo(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    """A smooth gradient with some texture: JPEG, blur and noise all have something to change."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height) + 60], axis=-1)
    texture = np.random.default_rng(seed).normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def _detail(image: Image.Image) -> float:
    """Mean absolute difference between horizontal neighbours: the fine detail a perturbation can remove."""
    return float(np.abs(np.diff(_pixels(image), axis=1)).mean())


def test_the_set_is_the_documented_one():
    assert VARIANTS == (
        "clean",
        "jpeg90",
        "jpeg70",
        "jpeg50",
        "jpeg30",
        "downscale_half",
        "upscale_2x",
        "blur",
        "noise",
        "crop",
    )


@pytest.mark.parametrize("perturbation", PERTURBATIONS, ids=lambda p: p.name)
def test_each_perturbation_changes_the_image_deterministically_and_leaves_its_input_alone(perturbation):
    image = _photo()
    before = np.asarray(image).copy()
    first, second = perturbation.apply(image), perturbation.apply(_photo())
    assert first.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    np.testing.assert_array_equal(np.asarray(image), before)
    if first.size == image.size:
        assert np.abs(_pixels(first) - _pixels(image)).mean() > 0.5


def test_jpeg_loses_more_the_lower_the_quality():
    image = _photo()
    errors = [np.mean((_pixels(BY_NAME[f"jpeg{q}"].apply(image)) - _pixels(image)) ** 2) for q in (90, 70, 50, 30)]
    assert errors == sorted(errors) and errors[0] > 0


def test_rescaling_blur_and_crop_keep_the_size_and_remove_fine_detail():
    checkerboard = Image.fromarray(((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)).convert("RGB")
    for name in ("downscale_half", "blur", "crop"):
        out = BY_NAME[name].apply(checkerboard)
        assert out.size == checkerboard.size, name
        assert _detail(out) < 0.5 * _detail(checkerboard), name
    flat = Image.new("RGB", (32, 32), (90, 140, 200))
    for name in ("downscale_half", "blur", "crop", "upscale_2x"):
        np.testing.assert_allclose(_pixels(BY_NAME[name].apply(flat)).mean((0, 1)), (90, 140, 200), atol=1)


def test_upscale_doubles_the_size_and_preprocessing_brings_it_back():
    image = _photo(32, 32)
    enlarged = BY_NAME["upscale_2x"].apply(image)
    assert enlarged.size == (64, 64)
    original, round_trip = to_model_array(image, 32).astype(float), to_model_array(enlarged, 32).astype(float)
    assert 0 < np.abs(round_trip - original).mean() < 10


def test_crop_zooms_into_the_centre():
    framed = np.zeros((40, 40, 3), dtype=np.uint8)
    framed[...] = (0, 0, 255)
    framed[:3], framed[-3:], framed[:, :3], framed[:, -3:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    cropped = _pixels(BY_NAME["crop"].apply(Image.fromarray(framed)))
    assert cropped.shape == (40, 40, 3)
    assert cropped[..., 0].max() == 0  # the red frame lies outside the central 80% and is gone


def test_noise_has_its_strength_and_differs_between_images():
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    other = Image.new("RGB", (64, 64), (120, 120, 120))
    noise_grey = _pixels(BY_NAME["noise"].apply(grey)) - 128
    noise_other = _pixels(BY_NAME["noise"].apply(other)) - 120
    assert abs(noise_grey.std() - 8) < 0.5 and abs(noise_grey.mean()) < 0.5
    assert np.corrcoef(noise_grey.ravel(), noise_other.ravel())[0, 1] < 0.1


def test_variants_are_the_clean_model_input_then_each_perturbation():
    image = _photo()
    stacked = variants(image, 32)
    assert stacked.shape == (len(VARIANTS), 3, 32, 32) and stacked.dtype == np.uint8
    np.testing.assert_array_equal(stacked[0], to_model_array(image, 32))
    np.testing.assert_array_equal(stacked[VARIANTS.index("blur")], to_model_array(BY_NAME["blur"].apply(image), 32))


def test_sample_caps_each_class_reproducibly():
    labels = np.array([0] * 10 + [1] * 3)
    chosen = sample(labels, per_class=4)
    assert list(np.bincount(labels[chosen])) == [4, 3]
    np.testing.assert_array_equal(chosen, sample(labels, per_class=4))
    assert list(chosen) == sorted(chosen)


def _textured_set(root: Path, count: int = 4) -> Path:
    """FAKE = fine noise, REAL = smooth gradients, as PNG files in FAKE/ and REAL/."""
    for folder in ("FAKE", "REAL"):
        (root / folder).mkdir(parents=True)
    for index in range(count):
        rng = np.random.default_rng(index)
        Image.fromarray(rng.integers(60, 200, (32, 32, 3), dtype=np.uint8)).save(root / "FAKE" / f"{index}.png")
        _photo(32, 32, seed=index).filter(ImageFilter.GaussianBlur(2)).save(root / "REAL" / f"{index}.png")
    return root


def _detail_scorer(images: np.ndarray) -> np.ndarray:
    """A toy detector that calls fine detail `ai`: neighbour differences, scaled to [0, 1]."""
    detail = np.abs(np.diff(images.astype(np.float64), axis=-1)).mean(axis=(1, 2, 3))
    return np.clip(detail / 40.0, 0.0, 1.0)


def test_report_scores_every_set_under_every_perturbation_with_the_documented_keys(tmp_path: Path):
    test_files, test_labels = labelled_images(_textured_set(tmp_path / "test"))
    extra = _textured_set(tmp_path / "extra")
    (extra / "REAL" / "broken\udcff.png").write_bytes(b"not an image")  # a name that is not UTF-8, shown escaped
    metrics, report = robustness_report(
        {"test": (test_files, test_labels), "sdxl": labelled_images(extra)}, _detail_scorer, 32, 0.2, num_workers=0
    )
    perturbations = [p.name for p in PERTURBATIONS]
    expected = {f"robust_{p}_{m}" for p in perturbations for m in ("auc", "fpr")}
    expected |= {"eval_sdxl_auc", "eval_sdxl_fpr"} | {
        f"eval_sdxl_{p}_{m}" for p in perturbations for m in ("auc", "fpr")
    }
    assert set(metrics) == expected
    assert report["perturbation_set"] == "v1" and set(report["datasets"]) == {"test", "sdxl"}
    results = report["datasets"]["test"]["results"]
    assert list(results) == list(VARIANTS)
    assert results["clean"] == {"auc": 1.0, "fpr": 0.0, "recall": 1.0, "accuracy": 1.0}
    assert metrics["robust_noise_fpr"] == 1.0  # noise gives the smooth real images fine detail
    assert results["blur"]["recall"] == 0.0  # blur takes the fakes' detail away
    extra_entry = report["datasets"]["sdxl"]
    assert extra_entry["images"] == 8 and extra_entry["images_available"] == 9
    assert [Path(s["path"]).name for s in extra_entry["skipped"]] == ["broken\\xff.png"]
    json.dumps(report, allow_nan=False, ensure_ascii=False).encode()  # plain UTF-8 JSON


def test_worker_processes_give_the_same_report(tmp_path: Path, monkeypatch):
    dataset = {"test": labelled_images(_textured_set(tmp_path / "set", count=3))}
    in_process = robustness_report(dataset, _detail_scorer, 32, 0.2, num_workers=0)
    monkeypatch.setattr(data, "_CHUNK", 1)  # so that even six files go to spawned worker processes
    assert robustness_report(dataset, _detail_scorer, 32, 0.2, num_workers=2) == in_process


def test_a_set_without_one_class_is_refused(tmp_path: Path):
    root = _textured_set(tmp_path / "set")
    for path in (root / "REAL").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="holds no images"):
        labelled_images(root)


def test_eval_dirs_accept_both_layouts_and_are_named_by_folder(make_dataset, tmp_path: Path):
    cifake_layout = make_dataset(train=2, test=2, name="SDXL v1")
    flat = _textured_set(tmp_path / "midjourney" / "test")
    config = load_config(None, {"eval_dirs": f"{cifake_layout}, {flat}"})
    assert config.evaluation.folders == {"sdxl_v1": cifake_layout / "test", "midjourney": flat}
    files, labels = labelled_images(config.evaluation.folders["sdxl_v1"])
    assert len(files) == 4 and list(labels) == [0, 0, 1, 1]  # real first, as CLASS_NAMES


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: str(tmp / "missing"), "is not a folder"),
        (lambda tmp: str(tmp), "holds neither test/FAKE and test/REAL nor FAKE and REAL"),
        (lambda tmp: f"{_textured_set(tmp / 'a' / 'gen')},{_textured_set(tmp / 'b' / 'gen')}", "would both log as"),
    ],
)
def test_bad_eval_dirs_are_a_config_error_naming_the_folder_and_the_fix(tmp_path: Path, make, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"eval_dirs": make(tmp_path)})


def test_augment_must_be_true_or_false():
    assert load_config(None, {"augment": True}).train.augment == "true"
    with pytest.raises(ConfigError, match=r"augment must be one of true\|false"):
        load_config(None, {"augment": "sometimes"})


def test_the_report_is_logged_as_metrics_and_artifacts(make_dataset, tmp_path: Path, tracking_store: str):
    prepared = data.prepare_splits(make_dataset(train=4, test=3), 0.25, 0, 0, seed=0, num_workers=0)
    extra = _textured_set(tmp_path / "extra")
    with tracking.tracked_run("cifake", "robustness") as run_id:
        logged = pipeline._log_robustness(tmp_path, prepared, {"extra": extra}, _detail_scorer, 32, "f1", 0.2, 0)
    run = MlflowClient().get_run(run_id)
    assert {"robust_jpeg50_auc", "robust_crop_fpr", "eval_extra_auc", "eval_extra_noise_fpr"} <= set(logged)
    assert set(logged) <= set(run.data.metrics)
    report = json.loads(
        Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="reports/robustness.json")).read_text()
    )
    assert report["threshold_name"] == "f1" and report["datasets"]["test"]["images"] == 6
    assert {"reports/robustness.json", "reports/robustness.png"} <= {
        item.path for item in MlflowClient().list_artifacts(run_id, "reports")
    }


def test_augment_degrades_about_half_the_images_reproducibly():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (400, 3, 32, 32), dtype=np.uint8))
    first = degrade(images, torch.Generator().manual_seed(1))
    assert first.dtype == torch.uint8 and first.shape == images.shape
    torch.testing.assert_close(first, degrade(images, torch.Generator().manual_seed(1)))
    changed = (first != images).flatten(1).any(1).float().mean().item()
    assert 0.4 < changed < 0.6
    assert (first.float() - images.float()).abs().flatten(1).mean(1).max() > 10  # degraded, not nudged


def test_translate_shifts_each_image_within_a_reflected_border_reproducibly():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (60, 3, 32, 32), dtype=np.uint8))
    shifted = random_translate(images, 3, torch.Generator().manual_seed(1))
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    torch.testing.assert_close(shifted, random_translate(images, 3, torch.Generator().manual_seed(1)))
    padded = torch.nn.functional.pad(images.float(), (3, 3, 3, 3), mode="reflect").to(torch.uint8)
    crops = {(dy, dx): padded[:, :, 3 + dy : 35 + dy, 3 + dx : 35 + dx] for dy in range(-3, 4) for dx in range(-3, 4)}
    found = [[shift for shift, crop in crops.items() if torch.equal(crop[i], shifted[i])] for i in range(len(images))]
    assert all(len(shifts) == 1 for shifts in found)  # every image is one reflect-padded crop within 3 pixels
    assert len({shifts[0] for shifts in found}) > 20  # drawn per image, not once per batch


def test_training_with_augment_runs_a_step():
    torch.manual_seed(0)
    model, _ = create_model(pretrained="false", pretrained_weights="", stem_stride=2)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8))
    labels = torch.tensor([0, 1] * 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=2)
    generator = torch.Generator().manual_seed(0)
    metrics = train_one_epoch(
        model, images, labels, torch.randperm(8), optimizer, scheduler, 4, torch.device("cpu"), generator, augment=True
    )
    assert np.isfinite(metrics["train_loss"])
