"""Tests of `cifake_core.demo.ensure_demo_dataset`, the embedded synthetic dataset: its CIFAKE layout and counts,
its README, byte-identical regeneration, no repeated image anywhere, the cache (no second generation), refusal of
foreign folders, and that the data module accepts it.

Counts are tiny (6 train and 2 test images per class) and every root lives under pytest's temporary folders.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from cifake_core import demo
from cifake_core.data import find_dataset_root, prepare_splits
from cifake_core.demo import README_NAME, default_demo_dir, ensure_demo_dataset
from cifake_core.files import CACHE_DIR_ENV

TRAIN, TEST = 6, 2
FOLDERS = ("train/FAKE", "train/REAL", "test/FAKE", "test/REAL")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_dataset(tmp_path_factory.mktemp("demo") / "cache", TRAIN, TEST)


def image_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_layout_and_counts(demo_root: Path) -> None:
    files = image_files(demo_root)
    for folder in FOLDERS:
        names = sorted(p.name for p in (demo_root / folder).iterdir())
        expected = TRAIN if folder.startswith("train") else TEST
        assert len(names) == expected, folder
        assert all(name.endswith(".jpg") for name in names)
    assert len(files) == 2 * (TRAIN + TEST)
    assert {"0.jpg", "0 (2).jpg"} <= {Path(name).name for name in files}  # CIFAKE-style names
    for content in files.values():
        with Image.open(io.BytesIO(content)) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
    assert {p.name for p in demo_root.iterdir()} == {"train", "test", README_NAME, demo.MARKER_NAME}
    assert [p.name for p in demo_root.parent.iterdir()] == [demo_root.name]  # no temporary folder left behind


def test_readme_says_it_is_a_demo_and_not_cifake(demo_root: Path) -> None:
    text = (demo_root / README_NAME).read_text()
    assert "DEMO" in text
    assert "NOT CIFAKE" in text
    assert f"{TRAIN} in train, {TEST} in test" in text


def test_two_generations_are_byte_identical(demo_root: Path, tmp_path: Path) -> None:
    again = ensure_demo_dataset(tmp_path / "elsewhere", TRAIN, TEST)
    assert again == tmp_path / "elsewhere"
    assert image_files(again) == image_files(demo_root)
    assert (again / README_NAME).read_bytes() == (demo_root / README_NAME).read_bytes()


def test_no_image_repeats_within_or_across_splits(demo_root: Path) -> None:
    digests = {name: hashlib.sha256(content).hexdigest() for name, content in image_files(demo_root).items()}
    train = {d for name, d in digests.items() if name.startswith("train/")}
    test = {d for name, d in digests.items() if name.startswith("test/")}
    assert train.isdisjoint(test)
    assert len(set(digests.values())) == len(digests)


def test_a_second_call_returns_without_regenerating(demo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p: p.stat().st_mtime_ns for p in [demo_root, *demo_root.rglob("*")]}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo dataset was generated again")

    monkeypatch.setattr(demo, "_generate", refuse)
    assert ensure_demo_dataset(demo_root, TRAIN, TEST) == demo_root
    assert {p: p.stat().st_mtime_ns for p in [demo_root, *demo_root.rglob("*")]} == before


def test_a_foreign_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        ensure_demo_dataset(foreign, TRAIN, TEST)
    assert os.listdir(foreign) == ["precious.txt"]
    assert (foreign / "precious.txt").read_text() == "keep me"
    assert os.listdir(tmp_path) == ["mine"]


def test_a_demo_with_other_counts_is_refused(demo_root: Path) -> None:
    with pytest.raises(FileExistsError):
        ensure_demo_dataset(demo_root, TRAIN + 1, TEST)
    assert len(image_files(demo_root)) == 2 * (TRAIN + TEST)


@pytest.mark.parametrize("train, test", [(0, 2), (6, 0), (-1, 1)])
def test_non_positive_counts_are_rejected(tmp_path: Path, train: int, test: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        ensure_demo_dataset(tmp_path / "demo", train, test)
    assert not (tmp_path / "demo").exists()


def test_the_default_folder_follows_the_cache_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path))
    assert default_demo_dir() == tmp_path / demo.DEMO_VERSION


def test_the_demo_passes_the_data_pipeline(demo_root: Path) -> None:
    assert find_dataset_root(demo_root) == demo_root
    prepared = prepare_splits(
        demo_root, val_fraction=0.2, max_train_per_class=0, max_test_per_class=0, seed=0, num_workers=1
    )
    assert prepared.summary["counts"] == {
        "train": {"real": 5, "ai": 5},
        "val": {"real": 1, "ai": 1},
        "test": {"real": TEST, "ai": TEST},
    }
    assert prepared.summary["skipped"] == []
    assert all(count == 0 for count in prepared.summary["duplicates"].values())
