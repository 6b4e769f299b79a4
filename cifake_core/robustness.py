"""Robustness report: how the detector holds up when an image is re-encoded, resized, blurred, noised or
cropped, as a phone, a messenger or a web page does to it, and on extra test sets (`eval_dirs`).

The perturbation set is fixed and versioned (PERTURBATION_SET_VERSION): change a perturbation or a
parameter and the version changes, so that runs are compared only on the same set. Each perturbation is a
pure, deterministic function of a decoded RGB image at its own resolution (noise is seeded by the image's
pixels), applied before the shared preprocessing: file -> `preprocessing.load_rgb` -> perturbation ->
`preprocessing.to_model_array` -> model. Every image is decoded once for all perturbations, in worker
processes. At most MAX_IMAGES_PER_CLASS images per class of each set are used (a fixed, seeded sample), which
keeps the report on CIFAKE's 20,000 test images to about a minute of two CPU cores with the default model (its
stride-1 stem and mirror view make 600-700 images/s in onnxruntime); AUC's standard error on 2 x 2,000 images is
about 0.003.

Per set and perturbation the report gives AUC, and the false-positive rate (real images called ai), recall
and accuracy at the model's default threshold. Metrics: `robust_<perturbation>_auc` / `_fpr` on the run's
test split; `eval_<set>_auc` / `_fpr` and `eval_<set>_<perturbation>_auc` / `_fpr` on an extra set.

Usage:
    metrics, report = robustness_report({"test": (files, labels)}, scorer.score_arrays, 32, threshold=0.5,
                                        num_workers=2)
    metrics["robust_jpeg50_auc"], report["datasets"]["test"]["results"]["blur"]["fpr"]
"""

from __future__ import annotations

import io
import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from cifake_core import CLASS_NAMES, FOLDER_FOR_CLASS
from cifake_core.data import IMAGE_EXTENSIONS, _parallel_map
from cifake_core.errors import DatasetError, ImageError
from cifake_core.files import printable_name
from cifake_core.metrics import binary_metrics
from cifake_core.preprocessing import load_rgb, to_model_array

PERTURBATION_SET_VERSION = "v1"
CLEAN = "clean"
TEST_SET = "test"  # the run's own test split; every other set is an extra one from eval_dirs
MAX_IMAGES_PER_CLASS = 2000
SAMPLE_SEED = 20240601
NOISE_SEED = 7
TABLE_FIGURES = ("auc", "fpr", "recall", "accuracy")
JPEG_SUBSAMPLING = 2  # 4:2:0, what phones, browsers and messengers use
# Decoded variants of one chunk of images stay below this many bytes, whatever the image_size.
CHUNK_BYTES = 256 * 2**20
Scorer = Callable[[np.ndarray], np.ndarray]
log = logging.getLogger(__name__)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """One more JPEG pass at `quality`."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def rescale(image: Image.Image, factor: float) -> Image.Image:
    """Resized by `factor` (antialiased) and back to its own size: detail below the smaller size is lost."""
    width, height = image.size
    smaller = image.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.Resampling.BILINEAR)
    return smaller.resize((width, height), Image.Resampling.BILINEAR)


def upscale(image: Image.Image, factor: int) -> Image.Image:
    """Enlarged `factor` times with bicubic interpolation; preprocessing then shrinks it back to the model's size."""
    width, height = image.size
    return image.resize((width * factor, height * factor), Image.Resampling.BICUBIC)


def blur(image: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with standard deviation `sigma` pixels."""
    return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def noise(image: Image.Image, sigma: float) -> Image.Image:
    """Additive Gaussian noise of `sigma` grey levels, seeded by the image's pixels: the same image always gets
    the same noise, and different images get independent noise."""
    pixels = np.asarray(image, dtype=np.uint8)
    rng = np.random.default_rng([NOISE_SEED, zlib.crc32(pixels.tobytes())])
    noisy = pixels.astype(np.float64) + rng.normal(0.0, sigma, pixels.shape)
    return Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))


def centre_crop(image: Image.Image, fraction: float) -> Image.Image:
    """The central `fraction` of each side, resized back to the image's size (a zoom-in)."""
    width, height = image.size
    crop_width, crop_height = max(1, round(width * fraction)), max(1, round(height * fraction))
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    cropped = image.crop((left, top, left + crop_width, top + crop_height))
    return cropped.resize((width, height), Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class Perturbation:
    name: str
    description: str
    apply: Callable[[Image.Image], Image.Image]


PERTURBATIONS: tuple[Perturbation, ...] = (
    *(
        Perturbation(f"jpeg{q}", f"JPEG re-encoding at quality {q}, 4:2:0", partial(jpeg, quality=q))
        for q in (90, 70, 50, 30)
    ),
    Perturbation("downscale_half", "downscaled to half size and back (bilinear)", partial(rescale, factor=0.5)),
    Perturbation("upscale_2x", "upscaled x2 (bicubic), as a page or phone enlarges", partial(upscale, factor=2)),
    Perturbation("blur", "Gaussian blur, sigma 1 pixel", partial(blur, sigma=1.0)),
    Perturbation("noise", "Gaussian noise, sigma 8 grey levels, seeded by the image", partial(noise, sigma=8.0)),
    Perturbation("crop", "central 80% of each side, resized back", partial(centre_crop, fraction=0.8)),
)
VARIANTS = (CLEAN, *(perturbation.name for perturbation in PERTURBATIONS))


def variants(image: Image.Image, image_size: int) -> np.ndarray:
    """The model inputs of one decoded image: clean, then each perturbation; uint8 (len(VARIANTS), 3, S, S)."""
    return np.stack(
        [to_model_array(image, image_size)] + [to_model_array(p.apply(image), image_size) for p in PERTURBATIONS]
    )


def _file_variants(task: tuple[str, int]) -> np.ndarray | str:
    """`variants` of one file, or why it cannot be read (an extra test set is not vetted like the run's splits)."""
    path, image_size = task
    try:
        return variants(load_rgb(path), image_size)
    except ImageError as error:
        return str(error)


def labelled_images(class_folder: Path) -> tuple[list[Path], np.ndarray]:
    """The image files of an extra test set (the folder holding FAKE/ and REAL/) and their labels (1 = ai)."""
    files: list[Path] = []
    labels: list[int] = []
    for index, label in enumerate(CLASS_NAMES):
        folder = class_folder / FOLDER_FOR_CLASS[label]
        found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise DatasetError(
                f"eval_dirs: {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): put the set's "
                f"{label} images there, or drop the folder from eval_dirs"
            )
        files.extend(found)
        labels.extend([index] * len(found))
    return files, np.asarray(labels, dtype=np.int64)


def sample(labels: np.ndarray, per_class: int = MAX_IMAGES_PER_CLASS) -> np.ndarray:
    """Sorted indices of at most `per_class` images of each class, the same for the same labels."""
    rng = np.random.default_rng(SAMPLE_SEED)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(members if len(members) <= per_class else rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def _score_variants(
    files: Sequence[Path], score: Scorer, image_size: int, num_workers: int
) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """prob_ai of each readable file under each variant (N, len(VARIANTS)), which files those are, and the rest."""
    per_chunk = max(1, CHUNK_BYTES // (len(VARIANTS) * 3 * image_size * image_size))
    scores: list[np.ndarray] = []
    readable: list[int] = []
    skipped: list[dict[str, str]] = []
    for start in range(0, len(files), per_chunk):
        tasks = [(str(path), image_size) for path in files[start : start + per_chunk]]
        arrays = []
        for offset, result in enumerate(_parallel_map(_file_variants, tasks, num_workers)):
            if isinstance(result, str):
                skipped.append({"path": printable_name(tasks[offset][0]), "reason": result})
            else:
                arrays.append(result)
                readable.append(start + offset)
        if arrays:
            batch = np.stack(arrays)
            flat = np.ascontiguousarray(batch.reshape(-1, *batch.shape[2:]))
            scores.append(np.asarray(score(flat), dtype=np.float64).reshape(len(arrays), len(VARIANTS)))
    all_scores = np.concatenate(scores) if scores else np.empty((0, len(VARIANTS)))
    return all_scores, np.asarray(readable, dtype=np.int64), skipped


def metric_prefix(dataset: str) -> str:
    return "robust" if dataset == TEST_SET else f"eval_{dataset}"


def _metrics(dataset: str, results: dict[str, dict[str, float]]) -> dict[str, float]:
    prefix = metric_prefix(dataset)
    metrics: dict[str, float] = {}
    for variant, figures in results.items():
        if variant == CLEAN and dataset == TEST_SET:
            continue  # the run's clean test figures are test_auc and test_fpr already
        name = prefix if variant == CLEAN else f"{prefix}_{variant}"
        metrics |= {f"{name}_auc": figures["auc"], f"{name}_fpr": figures["fpr"]}
    return metrics


def robustness_report(
    datasets: dict[str, tuple[Sequence[Path], np.ndarray]],
    score: Scorer,
    image_size: int,
    threshold: float,
    num_workers: int,
) -> tuple[dict[str, float], dict]:
    """Each set (name -> image files and labels, 1 = ai) scored clean and under each perturbation by `score`
    (uint8 (N, 3, S, S) -> prob_ai); returns the metrics to log and the table (`robustness.json`)."""
    report: dict = {
        "perturbation_set": PERTURBATION_SET_VERSION,
        "perturbations": {p.name: p.description for p in PERTURBATIONS},
        "threshold": threshold,
        "max_images_per_class": MAX_IMAGES_PER_CLASS,
        "datasets": {},
    }
    metrics: dict[str, float] = {}
    for name, (files, labels) in datasets.items():
        chosen = sample(np.asarray(labels))
        log.info("robustness: %s, %d images x %d variants", name, len(chosen), len(VARIANTS))
        scores, readable, skipped = _score_variants([files[i] for i in chosen], score, image_size, num_workers)
        kept_labels = np.asarray(labels)[chosen][readable]
        if len(np.unique(kept_labels)) < 2:
            raise DatasetError(f"{name}: the robustness report needs readable images of both classes, real and ai")
        results = {}
        for column, variant in enumerate(VARIANTS):
            figures = binary_metrics(kept_labels, scores[:, column], threshold, prefix=variant)
            results[variant] = {key: figures[f"{variant}_{key}"] for key in TABLE_FIGURES}
        report["datasets"][name] = {
            "images": int(len(kept_labels)),
            "images_available": len(files),
            "skipped": skipped,
            "results": results,
        }
        metrics |= _metrics(name, results)
    return metrics, report
