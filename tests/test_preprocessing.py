"""Tests of `cifake_core.preprocessing`, the one path from an image to the model's uint8 (3, S, S) input: shapes and
dtypes, centre cropping, transparency, EXIF orientation, high bit depth, the ImageError raised for every kind of
unusable input, and identical results for bytes, paths and PIL images.

All images are tiny and made in memory; the "huge" images are crafted PNG headers, never allocated.
"""

from __future__ import annotations

import gc
import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import image_bytes
from PIL import Image

from cifake_core import preprocessing
from cifake_core.errors import CifakeError, ImageError
from cifake_core.preprocessing import load_rgb, preprocess_batch, preprocess_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def random_rgb(seed: int, width: int = 32, height: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_claiming_size(width: int, height: int) -> bytes:
    """A valid 4x4 PNG whose IHDR is patched (CRC included) to claim width x height pixels."""
    content = bytearray(encode(Image.new("RGB", (4, 4))))
    assert content[12:16] == b"IHDR"
    content[16:24] = struct.pack(">II", width, height)
    content[29:33] = struct.pack(">I", zlib.crc32(bytes(content[12:29])))
    return bytes(content)


def assert_colour(array: np.ndarray, colour: tuple[int, int, int], tolerance: int = 0) -> None:
    """Every pixel of a (3, H, W) array is `colour`, within tolerance."""
    expected = np.array(colour).reshape(3, 1, 1)
    assert np.abs(array.astype(int) - expected).max() <= tolerance, array.transpose(1, 2, 0).reshape(-1, 3)[:4]


# --- shapes and dtypes -------------------------------------------------------------------------------------------


def test_preprocess_image_returns_the_pixels_channels_first_as_uint8() -> None:
    image = random_rgb(1)
    array = preprocess_image(encode(image), image_size=32)
    assert array.dtype == np.uint8 and array.shape == (3, 32, 32)
    np.testing.assert_array_equal(array, np.asarray(image).transpose(2, 0, 1))


@pytest.mark.parametrize("size", [8, 16, 48])
def test_preprocess_image_resizes_to_the_requested_side(size: int) -> None:
    array = preprocess_image(encode(Image.new("RGB", (32, 32), (10, 200, 90))), image_size=size)
    assert array.shape == (3, size, size) and array.dtype == np.uint8
    assert_colour(array, (10, 200, 90))


def test_load_rgb_returns_an_rgb_image_of_the_original_size() -> None:
    image = load_rgb(image_bytes(2, size=24, fmt="PNG", mode="L"))
    assert image.mode == "RGB" and image.size == (24, 24)


def test_preprocess_batch_stacks_images_from_mixed_sources(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    path.write_bytes(encode(random_rgb(3)))
    sources = [image_bytes(4), path, str(path), random_rgb(5, 20, 20)]
    batch = preprocess_batch(sources, image_size=16)
    assert batch.dtype == np.uint8 and batch.shape == (4, 3, 16, 16)
    for row, source in zip(batch, sources, strict=True):
        np.testing.assert_array_equal(row, preprocess_image(source, 16))
    assert preprocess_batch([], image_size=16).shape == (0, 3, 16, 16)


def test_preprocess_batch_raises_image_error_for_any_bad_member() -> None:
    with pytest.raises(ImageError):
        preprocess_batch([image_bytes(6), b"definitely not an image"], image_size=8)


# --- geometry ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(64, 32), (32, 64), (50, 30)])
def test_non_square_images_are_centre_cropped_then_resized(width: int, height: int) -> None:
    image = Image.new("RGB", (width, height), GREEN)
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image.paste(RED, (left, top, left + side, top + side))  # the centre square is red, the margins green
    array = preprocess_image(encode(image), image_size=16)
    assert array.shape == (3, 16, 16)
    assert_colour(array, RED)  # a squash or an off-centre crop would bring in green


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (16, 16), BLUE)
    image.paste(RED, (0, 0, 16, 8))  # top half red, bottom half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    upright = preprocess_image(encode(image, "JPEG", quality=95), 16)
    rotated = preprocess_image(encode(image, "JPEG", quality=95, exif=exif), 16)
    assert_colour(upright[:, :6, :], RED, tolerance=40)
    assert_colour(upright[:, 10:, :], BLUE, tolerance=40)
    # after a clockwise quarter turn the top (red) is on the right and the bottom (blue) on the left
    assert_colour(rotated[:, :, 10:], RED, tolerance=40)
    assert_colour(rotated[:, :, :6], BLUE, tolerance=40)
    assert load_rgb(encode(Image.new("RGB", (16, 8)), "JPEG", exif=exif)).size == (8, 16)


# --- colour modes ------------------------------------------------------------------------------------------------


def test_transparent_pixels_composite_on_white() -> None:
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[:, :4] = (200, 0, 0, 0)  # fully transparent red: must not show
    pixels[:, 4:] = (0, 0, 255, 255)  # opaque blue
    pixels[0, 7] = (0, 0, 0, 128)  # half-transparent black over white: mid-grey
    image = Image.fromarray(pixels, mode="RGBA")
    for source in (encode(image), image):
        array = preprocess_image(source, 8)
        assert_colour(array[:, :, :4], WHITE)
        assert_colour(array[:, 1:, 4:], BLUE)
        assert np.all(np.abs(array[:, 0, 7].astype(int) - 127) <= 1)


@pytest.mark.parametrize("mode", ["LA", "PA-like palette"])
def test_other_transparent_modes_composite_on_white(mode: str) -> None:
    if mode == "LA":
        image = Image.new("LA", (8, 8), (0, 0))
        data = encode(image)
    else:
        image = Image.new("P", (8, 8), 0)
        image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
        data = encode(image, transparency=0)
    assert_colour(preprocess_image(data, 8), WHITE)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "I", "F"])
def test_any_mode_comes_out_as_three_uint8_channels(mode: str) -> None:
    image = random_rgb(7, 16, 16).convert(mode)
    array = preprocess_image(image, 16)
    assert array.dtype == np.uint8 and array.shape == (3, 16, 16)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    data = encode(Image.fromarray(ramp))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    array = preprocess_image(data, 32)
    row = array[0, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0) and np.all(np.diff(row) <= 9)  # a smooth ramp, not a jump to white
    mid = preprocess_image(encode(Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))), 8)
    assert np.all(np.abs(mid.astype(int) - 128) <= 1)


def test_dark_sixteen_bit_images_stay_dark() -> None:
    outputs = []
    for value in (255, 256):
        data = encode(Image.fromarray(np.full((8, 8), value, dtype=np.uint16)))
        assert Image.open(io.BytesIO(data)).mode == "I;16"
        outputs.append(int(preprocess_image(data, 8).max()))
    # 255/65535 and 256/65535 of full scale are both ~1 in 8 bits
    assert outputs[0] <= 2 and outputs[1] <= 2


# --- unusable inputs ---------------------------------------------------------------------------------------------


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def _truncated_png() -> bytes:
    data = encode(random_rgb(8))
    return data[: len(data) // 2]


BAD_INPUTS = {
    "empty bytes": (b"", "empty"),
    "not an image": (b"this is plain text, not a picture" * 4, "not an image"),
    "truncated png": (_truncated_png(), "truncated"),
    "animated gif": (_animated_gif(), "2 frames"),
    "header claims 10^10 pixels": (png_claiming_size(100_000, 100_000), "too large"),
    "header claims 64 megapixels": (png_claiming_size(8_000, 8_000), "too large"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_unusable_bytes_raise_image_error_with_a_clear_message(name: str) -> None:
    data, phrase = BAD_INPUTS[name]
    with pytest.raises(ImageError, match=phrase) as excinfo:
        preprocess_image(data, 8)
    assert isinstance(excinfo.value, CifakeError) and isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize("name", ["truncated png", "animated gif", "header claims 64 megapixels"])
def test_unusable_files_raise_image_error_too(tmp_path: Path, name: str) -> None:
    data, phrase = BAD_INPUTS[name]
    path = tmp_path / "bad.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=phrase):
        load_rgb(path)


def test_a_missing_file_raises_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read .*nowhere.png: No such file"):
        load_rgb(tmp_path / "nowhere.png")
    # A name that is not UTF-8 is shown escaped: the message goes into tables and terminals that hold only text.
    with pytest.raises(ImageError, match=r"cannot read .*/gone\\xff.png: No such file") as raised:
        load_rgb(tmp_path / "gone\udcff.png")
    assert "\udcff" not in str(raised.value)


def test_the_pixel_limit_is_enforced(monkeypatch: pytest.MonkeyPatch) -> None:
    data = image_bytes(9, size=32, fmt="PNG")
    assert preprocess_image(data, 8).shape == (3, 8, 8)
    monkeypatch.setattr(preprocessing, "MAX_IMAGE_PIXELS", 32 * 32 - 1)
    with pytest.raises(ImageError, match="32x32"):
        preprocess_image(data, 8)
    with pytest.raises(ImageError, match="too large"):
        preprocess_image(random_rgb(10), 8)  # a PIL image is held to the same limit


def test_a_rejected_path_does_not_leak_its_file_handle(tmp_path: Path) -> None:
    path = tmp_path / "animated.gif"
    path.write_bytes(_animated_gif())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load_rgb(path)
        except ImageError:
            pass
        gc.collect()
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaks, leaks


# --- sources -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, build",
    [
        ("PNG", lambda: random_rgb(12, 40, 24)),
        ("PNG", lambda: random_rgb(13, 24, 24).convert("RGBA")),
        ("JPEG", lambda: random_rgb(14, 30, 20)),
    ],
    ids=["png", "png-rgba", "jpeg-exif"],
)
def test_bytes_path_and_pil_image_give_identical_arrays(tmp_path: Path, fmt: str, build) -> None:
    options = {}
    if fmt == "JPEG":
        exif = Image.Exif()
        exif[0x0112] = 6
        options["exif"] = exif
    data = encode(build(), fmt, **options)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    from_bytes = preprocess_image(data, 16)
    np.testing.assert_array_equal(preprocess_image(path, 16), from_bytes)
    np.testing.assert_array_equal(preprocess_image(str(path), 16), from_bytes)
    with Image.open(io.BytesIO(data)) as image:
        np.testing.assert_array_equal(preprocess_image(image, 16), from_bytes)
