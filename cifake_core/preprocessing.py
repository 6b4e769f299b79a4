"""The one image preprocessing path, shared by training, ONNX export, serving and the dashboard.

An image (bytes, a path or a PIL image, any format and mode Pillow reads) becomes a uint8 array of shape
(3, size, size): decoded, EXIF-rotated, converted to RGB, centre-cropped to a square and resized.
Normalisation is deliberately not here: it is the first layer of the network (`models.ImageClassifier`)
and so travels inside the exported ONNX graph, which leaves no constants that could drift between the
places that feed the model. This module imports no torch, so serving stays torch-free.

Usage:
    batch = preprocess_batch([png_bytes, "photo.jpg"], image_size=32)  # uint8, (2, 3, 32, 32)
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cifake_core.errors import ImageError
from cifake_core.files import printable_name

ImageSource = bytes | str | Path | Image.Image

# A 32x32 model gains nothing from gigapixel inputs, and decoding one can exhaust memory (a
# decompression bomb), so anything larger than a 50-megapixel photo is refused before decoding.
MAX_IMAGE_PIXELS = 50_000_000
# Decoded arrays are cached under this number (`data.load_split_arrays`): raise it whenever a change here
# changes the arrays this module produces, or runs would train on stale caches.
PREPROCESSING_VERSION = 1
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    # Paths are read whole: an image rejected before decoding then leaves no open file behind.
    try:
        content = source if isinstance(source, (bytes, bytearray, memoryview)) else Path(source).read_bytes()
    except OSError as error:
        raise ImageError(f"cannot read {printable_name(str(source))}: {error.strerror or error}") from error
    if len(content) == 0:
        raise ImageError("empty image: the value has no bytes")
    handle = io.BytesIO(content)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(handle)
    except UnidentifiedImageError as error:
        raise ImageError("not an image: the bytes are in no format Pillow can read") from error
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ImageError(f"image too large: more than {MAX_IMAGE_PIXELS:,} pixels") from error
    except OSError as error:
        raise ImageError(f"corrupt or truncated image: {error}") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        # Pillow's own conversion clips 16-bit values at 255; scaling keeps the picture. Mode I does not
        # say its bit depth, so there values above 255 are the sign of 16-bit data.
        values = np.asarray(image, dtype=np.float64)
        sixteen_bit = image.mode in _SIXTEEN_BIT_MODES or values.max(initial=0) > 255
        peak = 65535.0 if sixteen_bit else 255.0
        image = Image.fromarray(np.round(values * (255.0 / peak)).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        # Composite on white, as a viewer shows it, rather than exposing arbitrary hidden colours.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def load_rgb(source: ImageSource) -> Image.Image:
    """Decode one image fully into an RGB PIL image, or raise ImageError naming the problem."""
    image = _open(source)
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(f"image too large: {width}x{height} is more than {MAX_IMAGE_PIXELS:,} pixels")
    if getattr(image, "n_frames", 1) > 1:
        raise ImageError(f"animated or multi-page image ({image.n_frames} frames): send a single frame")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as error:
        raise ImageError(f"corrupt or truncated image: {error}") from error


def centre_square(width: int, height: int) -> tuple[int, int, int]:
    """(left, top, side) of the centred square that the model sees of a width x height image."""
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def to_model_array(image: Image.Image, image_size: int) -> np.ndarray:
    """An RGB image as the model's uint8 (3, image_size, image_size) input: centre square crop, bilinear resize."""
    left, top, side = centre_square(*image.size)
    if image.size != (side, side):
        image = image.crop((left, top, left + side, top + side))
    if side != image_size:
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def preprocess_image(source: ImageSource, image_size: int) -> np.ndarray:
    """One image from any source as the model's uint8 (3, image_size, image_size) input."""
    return to_model_array(load_rgb(source), image_size)


def preprocess_batch(sources: Sequence[ImageSource], image_size: int) -> np.ndarray:
    """Several images as one uint8 (N, 3, image_size, image_size) batch; any bad image raises ImageError."""
    batch = np.empty((len(sources), 3, image_size, image_size), dtype=np.uint8)
    for index, source in enumerate(sources):
        batch[index] = preprocess_image(source, image_size)
    return batch
