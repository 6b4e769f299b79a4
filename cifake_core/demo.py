"""Embedded synthetic DEMO dataset in the CIFAKE folder layout, so training runs with no download.

REAL images are random 32x32 crops of the few photographs that scikit-learn and matplotlib ship;
FAKE images are re-synthesised from such crops by a small fixed "decoder" (strided transposed
convolutions with pseudo-random kernels), which leaves the up-sampling texture artefacts that real
generators leave.  Both classes are JPEG-encoded identically, so only image statistics tell them
apart.  The dataset is generated deterministically on first use and cached.

Usage::

    from cifake_core.demo import ensure_demo_dataset
    root = ensure_demo_dataset()  # <root>/{train,test}/{REAL,FAKE}/*.jpg
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import tempfile
import time
from io import BytesIO

import numpy as np
from PIL import Image

from cifake_core.files import cache_dir

DEMO_VERSION: str = "demo-v1"
DEMO_TRAIN_PER_CLASS: int = 2000
DEMO_TEST_PER_CLASS: int = 500

IMAGE_SIDE = 32
SPLITS = ("train", "test")
LABELS = ("FAKE", "REAL")

MARKER_NAME = ".complete"
README_NAME = "README.txt"
TEMP_PREFIX_SUFFIX = ".partial-"
# A full generation takes seconds, so a temp folder this old belongs to a killed run, not a live one.
STALE_TEMP_SECONDS = 3600

# Photographs only: matplotlib's other sample images are plots, logos and clip-art.
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg",)

# Same as CIFAKE: quality 75 with 4:2:0 chroma subsampling, for both classes alike.
JPEG_QUALITY = 75
JPEG_SUBSAMPLING = 2

# Crop sides (pixels of the source photo), drawn log-uniformly so that both near-native detail
# and heavily downscaled scenes occur.
MIN_CROP_SIDE = 40
MAX_CROP_FRACTION = 0.7

# The fake "latent" image: low-resolution content that the decoder up-samples to IMAGE_SIDE.
# Mixing two resolutions keeps the fakes from being uniformly blurry, i.e. keeps the task non-trivial.
FAKE_BASE_SIDES = (8, 16)
DECODER_KERNEL = 3  # odd kernel with stride 2: uneven overlap, hence checkerboard artefacts
DECODER_STRIDE = 2
# Bilinear up-sampling taps; the random part of each kernel is added on top of them.
BILINEAR_TAPS = np.array([0.5, 1.0, 0.5])
KERNEL_JITTER = 0.015
NONLINEAR_GAIN = 0.6  # steepness of the mild S-curve after each layer
LAYER_NOISE_STD = 0.005  # per-layer noise injection, in units of the [0, 1] pixel range
OUTPUT_NOISE_STD = 0.005

NAMES_PER_GROUP = 10  # CIFAKE-style names: "17.jpg", "17 (2).jpg" ... "17 (10).jpg"
MAX_DRAWS_PER_IMAGE = 100


def default_demo_dir() -> pathlib.Path:
    """$CIFAKE_CACHE_DIR/<DEMO_VERSION> if that variable is set, else ~/.cache/cifake/<DEMO_VERSION>."""
    return cache_dir() / DEMO_VERSION


def ensure_demo_dataset(
    root: pathlib.Path | None = None,
    train_per_class: int = DEMO_TRAIN_PER_CLASS,
    test_per_class: int = DEMO_TEST_PER_CLASS,
) -> pathlib.Path:
    """Return the root of the demo dataset, generating it first if it is not there yet."""
    root = pathlib.Path(root).expanduser() if root is not None else default_demo_dir()
    counts = {"train": train_per_class, "test": test_per_class}
    if any(n < 1 for n in counts.values()):
        raise ValueError(f"image counts per class must be positive, got {counts}")
    marker = _marker_text(counts)
    if _is_complete(root, marker):
        return root
    _refuse_foreign_folder(root)

    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_folders(root)
    temp = pathlib.Path(tempfile.mkdtemp(prefix=root.name + TEMP_PREFIX_SUFFIX, dir=root.parent))
    try:
        _generate(temp, counts)
        (temp / MARKER_NAME).write_text(marker)
        _publish(temp, root, marker)
    finally:
        if temp.exists():
            shutil.rmtree(temp)
    return root


def _marker_text(counts: dict[str, int]) -> str:
    return json.dumps({"version": DEMO_VERSION, **counts}, sort_keys=True) + "\n"


def _is_complete(root: pathlib.Path, marker: str) -> bool:
    try:
        return (root / MARKER_NAME).read_text() == marker
    except OSError:
        return False


def _refuse_foreign_folder(root: pathlib.Path) -> None:
    if root.exists() or root.is_symlink():
        raise FileExistsError(
            f"{root} exists but is not a complete cifake demo dataset ({DEMO_VERSION} with these "
            f"image counts); delete it or choose another folder, and it will be generated afresh"
        )


def _remove_stale_temp_folders(root: pathlib.Path) -> None:
    cutoff = time.time() - STALE_TEMP_SECONDS
    for leftover in root.parent.glob(root.name + TEMP_PREFIX_SUFFIX + "*"):
        try:
            if leftover.is_dir() and leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover)
        except OSError:
            pass  # another process may be cleaning it up at the same time


def _publish(temp: pathlib.Path, root: pathlib.Path, marker: str) -> None:
    try:
        temp.rename(root)
    except OSError:
        # A concurrent run may have published the same dataset first; that is as good as ours.
        if not _is_complete(root, marker):
            raise


def _generate(target: pathlib.Path, counts: dict[str, int]) -> None:
    photos = _load_photos()
    kernels = _decoder_kernels()
    seen: set[bytes] = set()  # digests of every file so far: no image repeats within or across splits
    for split in SPLITS:
        for label in LABELS:
            folder = target / split / label
            folder.mkdir(parents=True)
            rng = np.random.default_rng(_seed(split, label))
            for index in range(counts[split]):
                data = _draw_unique(rng, label, photos, kernels, seen)
                (folder / _cifake_name(index)).write_bytes(data)
    (target / README_NAME).write_text(_readme_text(counts))


def _seed(*parts: str) -> int:
    # hashlib, not hash(): Python's string hash is salted per process.
    digest = hashlib.sha256("/".join((DEMO_VERSION, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _load_photos() -> list[Image.Image]:
    photos = [Image.fromarray(array) for array in _sklearn_photos()] + _matplotlib_photos()
    if not photos:
        raise RuntimeError("no sample photographs found in scikit-learn or matplotlib to build the demo")
    return photos


def _sklearn_photos() -> list[np.ndarray]:
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
    except (ImportError, OSError):
        return []
    named = zip(bunch.filenames, bunch.images, strict=True)
    by_name = {pathlib.Path(path).name: image for path, image in named}
    return [by_name[name] for name in SKLEARN_PHOTOS if name in by_name]


def _matplotlib_photos() -> list[Image.Image]:
    try:
        from matplotlib import cbook
    except ImportError:
        return []
    photos = []
    for name in MATPLOTLIB_PHOTOS:
        try:
            path = cbook.get_sample_data(name, asfileobj=False)
            with Image.open(path) as photo:
                photos.append(photo.convert("RGB"))
        except OSError:
            continue
    return photos


def _decoder_kernels() -> dict[int, list[np.ndarray]]:
    """Fixed transposed-convolution kernels, (out, in, k, k), for each base side's chain of layers."""
    rng = np.random.default_rng(_seed("decoder"))
    bilinear = np.einsum("oc,i,j->ocij", np.eye(3), BILINEAR_TAPS, BILINEAR_TAPS)
    shape = (3, 3, DECODER_KERNEL, DECODER_KERNEL)
    kernels = {}
    for side in FAKE_BASE_SIDES:
        chain = []
        for _ in range(int(np.log2(IMAGE_SIDE // side))):
            jitter = KERNEL_JITTER * rng.standard_normal(shape)
            # Zero-sum jitter keeps the colours and mean brightness; it only unbalances the phases.
            jitter -= jitter.mean(axis=(2, 3), keepdims=True)
            chain.append(bilinear + jitter)
        kernels[side] = chain
    return kernels


def _draw_unique(
    rng: np.random.Generator,
    label: str,
    photos: list[Image.Image],
    kernels: dict[int, list[np.ndarray]],
    seen: set[bytes],
) -> bytes:
    for _ in range(MAX_DRAWS_PER_IMAGE):
        pixels = _real_image(rng, photos) if label == "REAL" else _fake_image(rng, photos, kernels)
        data = _encode_jpeg(pixels)
        digest = hashlib.sha256(data).digest()
        if digest not in seen:
            seen.add(digest)
            return data
    raise RuntimeError(f"could not draw a new distinct {label} image in {MAX_DRAWS_PER_IMAGE} tries")


def _random_crop(rng: np.random.Generator, photos: list[Image.Image], side: int) -> Image.Image:
    """A random square crop at a random scale, flipped half the time, resized to side x side."""
    photo = photos[rng.integers(len(photos))]
    width, height = photo.size
    max_crop = max(MIN_CROP_SIDE, int(MAX_CROP_FRACTION * min(width, height)))
    crop = int(np.exp(rng.uniform(np.log(MIN_CROP_SIDE), np.log(max_crop))))
    left = int(rng.integers(width - crop + 1))
    top = int(rng.integers(height - crop + 1))
    # Lanczos from the full-resolution box is the antialiased downscale.
    image = photo.resize((side, side), Image.Resampling.LANCZOS, box=(left, top, left + crop, top + crop))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def _real_image(rng: np.random.Generator, photos: list[Image.Image]) -> np.ndarray:
    return np.asarray(_random_crop(rng, photos, IMAGE_SIDE))


def _fake_image(
    rng: np.random.Generator, photos: list[Image.Image], kernels: dict[int, list[np.ndarray]]
) -> np.ndarray:
    side = FAKE_BASE_SIDES[rng.integers(len(FAKE_BASE_SIDES))]
    latent = np.asarray(_random_crop(rng, photos, side), dtype=np.float64)
    # Channels first, in [0, 1]: non-negative like a decoder's post-ReLU activations, so the kernels'
    # phase imbalance leaves a checkerboard of fixed sign, as in real generators.
    x = latent.transpose(2, 0, 1) / 255.0
    for kernel in kernels[side]:
        x = _soft_saturate(_transposed_conv(x, kernel))
        x += LAYER_NOISE_STD * rng.standard_normal(x.shape)
    x += OUTPUT_NOISE_STD * rng.standard_normal(x.shape)
    return np.clip(np.rint(x.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


def _soft_saturate(x: np.ndarray) -> np.ndarray:
    """Mild S-curve on [0, 1] that keeps black, mid-grey and white in place."""
    return 0.5 + 0.5 * np.tanh(NONLINEAR_GAIN * (2.0 * x - 1.0)) / np.tanh(NONLINEAR_GAIN)


def _transposed_conv(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Stride-2 transposed convolution of a (channels, n, n) image to (channels, 2n, 2n)."""
    pad = 1  # edge replication, so the border rows get the same overlap count as the interior
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    n, k = x.shape[-1], kernel.shape[-1]
    span = DECODER_STRIDE * (n - 1) + 1
    full = np.zeros((kernel.shape[0], span + k - 1, span + k - 1))
    for i in range(k):
        for j in range(k):
            full[:, i : i + span : DECODER_STRIDE, j : j + span : DECODER_STRIDE] += np.einsum(
                "oc,chw->ohw", kernel[:, :, i, j], x
            )
    # Padded pixel p has its centre tap at full[stride * p + k // 2]; start at the first unpadded one.
    start = DECODER_STRIDE * pad + k // 2
    size = DECODER_STRIDE * (n - 2 * pad)
    return full[:, start : start + size, start : start + size]


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
    return buffer.getvalue()


def _cifake_name(index: int) -> str:
    group, member = divmod(index, NAMES_PER_GROUP)
    return f"{group}.jpg" if member == 0 else f"{group} ({member + 1}).jpg"


def _readme_text(counts: dict[str, int]) -> str:
    size = f"{IMAGE_SIDE}x{IMAGE_SIDE}"
    base_sizes = " or ".join(f"{side}x{side}" for side in FAKE_BASE_SIDES)
    return f"""\
cifake DEMO dataset ({DEMO_VERSION}) -- synthetic, NOT CIFAKE

This folder was generated by cifake so that training can run with no download. It only mimics
the CIFAKE folder layout (train/ and test/, each with REAL/ and FAKE/ JPEG files of {size} pixels).

REAL: random crops of the few sample photographs shipped with scikit-learn and matplotlib,
      at random scales and positions, randomly flipped, downscaled to {size}.
FAKE: the same kind of crops reduced to {base_sizes} and decoded back to {size} by a fixed
      chain of stride-2 transposed convolutions with pseudo-random kernels, a mild nonlinearity
      and a little noise -- a crude stand-in for a generator's decoder.
Both classes are saved identically (JPEG quality {JPEG_QUALITY}, 4:2:0 chroma subsampling).

Images per class: {counts["train"]} in train, {counts["test"]} in test.

Accuracy, AUC or any other figure measured on this dataset says nothing about how well a model
detects real AI-generated images. Use the real CIFAKE dataset for that.
"""
