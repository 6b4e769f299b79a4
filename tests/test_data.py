"""Tests of `cifake_core.data`: finding a dataset root, building the splits, deduplication, skipping unreadable
files, decoding every image mode through the dataset path, the scan and decoded-image caches, writing the split
files, and the download's fast, offline failures.

Every dataset is made on the spot in a temporary folder (the `make_dataset` fixture); nothing touches the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import image_bytes
from PIL import Image

from cifake_core import data
from cifake_core.data import (
    MANIFEST_FILE,
    SUMMARY_FILE,
    PreparedData,
    download_cifake,
    find_dataset_root,
    load_split_arrays,
    prepare_splits,
    read_split_files,
    write_split_files,
)
from cifake_core.errors import DatasetError

FOLDERS = ("train/FAKE", "train/REAL", "test/FAKE", "test/REAL")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test instead of reaching the internet."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def prepare(root: Path, val_fraction: float = 0.25, seed: int = 0, **caps: int) -> PreparedData:
    return prepare_splits(
        root,
        val_fraction=val_fraction,
        max_train_per_class=caps.get("max_train_per_class", 0),
        max_test_per_class=caps.get("max_test_per_class", 0),
        seed=seed,
        num_workers=1,
    )


def paths_of(prepared: PreparedData, split: str, label: str | None = None) -> set[str]:
    rows = prepared.manifest[prepared.manifest.split == split]
    if label is not None:
        rows = rows[rows.label == label]
    return set(rows.path)


def source_files(root: Path, folder: str) -> set[str]:
    return {p.relative_to(root).as_posix() for p in (root / folder).iterdir() if p.is_file()}


def first_quoted(message: str) -> str:
    match = re.search(r"'([^']*)'", message)
    assert match, f"no quoted path in {message!r}"
    return match.group(1)


# --- find_dataset_root ---------------------------------------------------------------------------------------------


def test_find_dataset_root_rejects_a_missing_folder_and_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no such dataset"
    with pytest.raises(DatasetError) as excinfo:
        find_dataset_root(missing)
    assert str(missing) in str(excinfo.value)
    assert "does not exist" in str(excinfo.value)


@pytest.mark.parametrize("folder", FOLDERS)
def test_find_dataset_root_names_the_missing_class_folder(make_dataset, folder: str) -> None:
    root = make_dataset(train=1, test=1)
    shutil.rmtree(root / folder)
    with pytest.raises(DatasetError) as excinfo:
        find_dataset_root(root)
    message = str(excinfo.value)
    assert message.startswith("missing folder")
    assert first_quoted(message) == str(root / folder)


def test_find_dataset_root_on_an_empty_folder_asks_for_train_fake(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as excinfo:
        find_dataset_root(tmp_path)
    assert first_quoted(str(excinfo.value)) == str(tmp_path / "train" / "FAKE")


@pytest.mark.parametrize("leftover", [None, "notes.txt"], ids=["no files", "only a text file"])
def test_find_dataset_root_rejects_a_class_folder_without_images(make_dataset, leftover: str | None) -> None:
    root = make_dataset(train=2, test=2)
    empty = root / "test" / "REAL"
    for path in empty.iterdir():
        path.unlink()
    if leftover:
        (empty / leftover).write_text("not an image")
    with pytest.raises(DatasetError) as excinfo:
        find_dataset_root(root)
    assert first_quoted(str(excinfo.value)) == str(empty)
    assert "no images" in str(excinfo.value)


def test_find_dataset_root_finds_the_dataset_one_folder_down(make_dataset, tmp_path: Path) -> None:
    root = make_dataset(train=1, test=1, name="download/cifake")
    (tmp_path / "download" / "__MACOSX").mkdir()  # a sibling folder without the layout is ignored
    assert find_dataset_root(tmp_path / "download") == root
    assert find_dataset_root(root) == root


# --- prepare_splits: counts, validation share, determinism, caps --------------------------------------------------


def test_prepare_splits_counts_every_split_and_class(make_dataset) -> None:
    root = make_dataset(train=8, test=3)
    prepared = prepare(root, val_fraction=0.25)
    expected = {
        "train": {"real": 6, "ai": 6},
        "val": {"real": 2, "ai": 2},
        "test": {"real": 3, "ai": 3},
    }
    assert prepared.summary["counts"] == expected
    assert prepared.summary["images_found"] == {"train": {"real": 8, "ai": 8}, "test": {"real": 3, "ai": 3}}
    observed = prepared.manifest.groupby(["split", "label"]).size().to_dict()
    assert observed == {(split, label): n for split, by_label in expected.items() for label, n in by_label.items()}
    assert prepared.summary["duplicates"]["within_train"] == 0
    assert prepared.summary["skipped"] == []
    assert prepared.root == root


def test_validation_is_a_stratified_share_of_train(make_dataset) -> None:
    root = make_dataset(train=20, test=2)
    prepared = prepare(root, val_fraction=0.2)
    for label, folder in (("ai", "train/FAKE"), ("real", "train/REAL")):
        val = paths_of(prepared, "val", label)
        train = paths_of(prepared, "train", label)
        assert len(val) == 4  # 20% of 20, in each class
        assert val.isdisjoint(train)
        assert val | train == source_files(root, folder)
    test = paths_of(prepared, "test")
    assert test == source_files(root, "test/FAKE") | source_files(root, "test/REAL")


def test_no_path_appears_in_two_splits(make_dataset) -> None:
    prepared = prepare(make_dataset(train=10, test=4), val_fraction=0.3)
    assert prepared.manifest.path.is_unique
    assert prepared.manifest.sha256.is_unique
    splits = [paths_of(prepared, split) for split in ("train", "val", "test")]
    assert sum(len(s) for s in splits) == len(set.union(*splits)) == len(prepared.manifest)


def test_same_inputs_and_seed_give_the_same_manifest_and_fingerprint(make_dataset) -> None:
    root = make_dataset(train=12, test=3)
    first, second = prepare(root, seed=7), prepare(root, seed=7)
    pd.testing.assert_frame_equal(first.manifest, second.manifest)
    assert first.fingerprint == second.fingerprint
    assert len(first.fingerprint) == 16


def test_another_seed_changes_validation_but_not_test(make_dataset) -> None:
    root = make_dataset(train=12, test=3)
    first, other = prepare(root, seed=0), prepare(root, seed=1)
    assert paths_of(first, "val") != paths_of(other, "val")
    assert paths_of(first, "train") | paths_of(first, "val") == paths_of(other, "train") | paths_of(other, "val")
    assert paths_of(first, "test") == paths_of(other, "test")
    assert first.fingerprint != other.fingerprint


def test_caps_limit_each_class_and_balance_them(make_dataset) -> None:
    root = make_dataset(train=10, test=5)
    prepared = prepare(root, val_fraction=0.25, max_train_per_class=4, max_test_per_class=2)
    assert prepared.summary["counts"] == {
        "train": {"real": 3, "ai": 3},
        "val": {"real": 1, "ai": 1},
        "test": {"real": 2, "ai": 2},
    }
    all_test = source_files(root, "test/FAKE") | source_files(root, "test/REAL")
    assert paths_of(prepared, "test") <= all_test
    assert prepared.summary["max_train_per_class"] == 4 and prepared.summary["max_test_per_class"] == 2


def test_a_cap_only_limits_a_class_that_exceeds_it(make_dataset) -> None:
    root = make_dataset(train=4, test=2)
    for path in sorted((root / "train" / "REAL").iterdir())[:1]:
        path.unlink()  # REAL keeps 3 train images, below the cap of 4 only for FAKE
    for index in range(4):
        (root / "train" / "FAKE" / f"extra {index}.jpg").write_bytes(image_bytes(1000 + index))
    prepared = prepare(root, val_fraction=0.25, max_train_per_class=4)
    counts = prepared.summary["counts"]
    assert counts["train"]["ai"] + counts["val"]["ai"] == 4
    assert counts["train"]["real"] + counts["val"]["real"] == 3


def test_changing_the_train_cap_keeps_the_test_split(make_dataset) -> None:
    root = make_dataset(train=10, test=5)
    loose = prepare(root, max_train_per_class=8, max_test_per_class=3)
    tight = prepare(root, max_train_per_class=4, max_test_per_class=3)
    assert paths_of(loose, "test") == paths_of(tight, "test")


def test_paths_with_spaces_brackets_and_commas_work(make_dataset, tmp_path: Path) -> None:
    root = make_dataset(train=4, test=1)
    odd_folder = root / "test" / "REAL" / "sub dir (1)"
    odd_folder.mkdir()
    odd_names = {
        "test/REAL/[x] a b (1).jpg": image_bytes(501),
        "test/REAL/weird, name [2].png": image_bytes(502, fmt="PNG"),
        "test/REAL/sub dir (1)/7 (12).jpg": image_bytes(503),
    }
    for relative, content in odd_names.items():
        (root / relative).write_bytes(content)
    prepared = prepare(root)
    assert set(odd_names) <= paths_of(prepared, "test", "real")
    images, labels = load_split_arrays(prepared, "test", image_size=8, num_workers=1)
    assert images.shape == (5, 3, 8, 8)
    manifest_path, _ = write_split_files(prepared, tmp_path / "out")
    read_back = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    assert set(odd_names) <= set(read_back.path)


# --- duplicates and the fingerprint --------------------------------------------------------------------------------


def test_identical_copies_inside_train_are_kept_once(make_dataset) -> None:
    root = make_dataset(train=6, test=3)
    original = root / "train" / "FAKE" / "0 (1).jpg"
    (root / "train" / "FAKE" / "nested").mkdir()
    shutil.copyfile(original, root / "train" / "FAKE" / "copy 1.jpg")
    shutil.copyfile(original, root / "train" / "FAKE" / "nested" / "copy 2.jpg")
    prepared = prepare(root)
    assert prepared.summary["duplicates"]["within_train"] == 2
    assert prepared.summary["images_found"]["train"]["ai"] == 8
    counts = prepared.summary["counts"]
    assert counts["train"]["ai"] + counts["val"]["ai"] == 6
    assert prepared.manifest.sha256.is_unique
    copies = {"train/FAKE/0 (1).jpg", "train/FAKE/copy 1.jpg", "train/FAKE/nested/copy 2.jpg"}
    assert len(copies & set(prepared.manifest.path)) == 1


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs symbolic links")
def test_the_scan_takes_links_to_files_not_links_to_folders_and_keeps_a_duplicates_first_copy_in_path_order(
    make_dataset,
) -> None:
    """As pathlib's rglob listed them: a link to an image counts, a link to a folder is not walked, a dangling link
    is no file; among copies, the first in `Path` order stays ('a/b.jpg' before 'a.jpg', where strings sort the
    other way), so the manifest does not move with how the folder is listed."""
    root = make_dataset(train=6, test=3)
    fake, real = root / "train" / "FAKE", root / "train" / "REAL"
    (fake / "a").mkdir()
    shutil.copyfile(fake / "0 (1).jpg", fake / "a" / "b.jpg")
    shutil.copyfile(fake / "0 (1).jpg", fake / "a.jpg")
    (fake / "0 (1).jpg").unlink()
    (fake / "linked.jpg").symlink_to(real / "0 (7).jpg")  # the same bytes as a REAL image: both copies dropped
    (fake / "real folder").symlink_to(real, target_is_directory=True)
    (fake / "dangling.jpg").symlink_to(root / "no such file.jpg")
    prepared = prepare(root)
    assert prepared.summary["images_found"]["train"]["ai"] == 8  # 5 left, a/b.jpg, a.jpg and linked.jpg
    assert prepared.summary["duplicates"] == {
        "within_train": 1,
        "within_test": 0,
        "conflicting_labels": 2,
        "train_copies_of_test_dropped": 0,
    }
    paths = set(prepared.manifest.path)
    assert "train/FAKE/a/b.jpg" in paths and "train/FAKE/a.jpg" not in paths
    assert not any(path.startswith("train/FAKE/real folder") or "dangling" in path for path in paths)


def test_identical_copies_inside_test_are_kept_once(make_dataset) -> None:
    root = make_dataset(train=6, test=3)
    original = sorted((root / "test" / "REAL").iterdir())[0]
    shutil.copyfile(original, root / "test" / "REAL" / "again.jpg")
    prepared = prepare(root)
    assert prepared.summary["duplicates"]["within_test"] == 1
    assert prepared.summary["duplicates"]["within_train"] == 0
    assert prepared.summary["counts"]["test"] == {"real": 3, "ai": 3}
    assert prepared.manifest.sha256.is_unique


@pytest.mark.parametrize("train_folder", ["train/REAL", "train/FAKE"])
def test_a_train_copy_of_a_test_image_is_dropped_from_train(make_dataset, train_folder: str) -> None:
    root = make_dataset(train=6, test=3)
    test_image = sorted(source_files(root, "test/REAL"))[0]
    shutil.copyfile(root / test_image, root / train_folder / "leak.jpg")
    prepared = prepare(root)
    assert prepared.summary["duplicates"]["train_copies_of_test_dropped"] == 1
    rows = prepared.manifest[prepared.manifest.sha256 == prepared.manifest.set_index("path").sha256[test_image]]
    assert list(rows.path) == [test_image] and list(rows.split) == ["test"]
    assert f"{train_folder}/leak.jpg" not in set(prepared.manifest.path)
    assert prepared.summary["counts"]["test"] == {"real": 3, "ai": 3}
    counts = prepared.summary["counts"]
    assert {label: counts["train"][label] + counts["val"][label] for label in ("real", "ai")} == {"real": 6, "ai": 6}


def test_the_same_bytes_filed_under_both_classes_are_dropped(make_dataset) -> None:
    root = make_dataset(train=6, test=3)
    shutil.copyfile(root / "train" / "FAKE" / "0 (1).jpg", root / "train" / "REAL" / "mislabelled.jpg")
    prepared = prepare(root)
    assert prepared.summary["duplicates"]["conflicting_labels"] == 2
    assert "train/FAKE/0 (1).jpg" not in set(prepared.manifest.path)
    assert "train/REAL/mislabelled.jpg" not in set(prepared.manifest.path)


def test_the_fingerprint_follows_bytes_not_paths(make_dataset) -> None:
    first_root = make_dataset(train=6, test=2, name="first")
    second_root = make_dataset(train=6, test=2, name="second")  # same bytes, another folder
    reference = prepare(first_root).fingerprint
    assert prepare(second_root).fingerprint == reference
    renamed = second_root / "test" / "FAKE" / "renamed.jpg"
    (second_root / "test" / "FAKE" / "0 (13).jpg").rename(renamed)
    assert prepare(second_root).fingerprint == reference
    renamed.write_bytes(image_bytes(999))
    assert prepare(second_root).fingerprint != reference


# --- unreadable files ------------------------------------------------------------------------------------------------


def test_unreadable_files_are_skipped_with_a_reason(make_dataset) -> None:
    root = make_dataset(train=8, test=2)
    good = image_bytes(777)
    bad = {
        "train/FAKE/truncated.jpg": good[: len(good) // 2],
        "train/FAKE/random.jpg": np.random.default_rng(3).bytes(600),
        "train/FAKE/empty.jpg": b"",
        "train/FAKE/notes.txt": b"these are notes",
        "test/REAL/broken.png": image_bytes(778, fmt="PNG")[:60],
    }
    for relative, content in bad.items():
        (root / relative).write_bytes(content)
    prepared = prepare(root)
    skipped = {entry["path"]: entry["reason"] for entry in prepared.summary["skipped"]}
    assert set(skipped) == set(bad)
    assert all(reason for reason in skipped.values())
    assert "extension" in skipped["train/FAKE/notes.txt"]
    assert "empty" in skipped["train/FAKE/empty.jpg"]
    assert "truncated" in skipped["train/FAKE/truncated.jpg"].lower()
    assert prepared.summary["skipped_count"] == len(bad)
    assert prepared.summary["images_found"] == {"train": {"real": 8, "ai": 8}, "test": {"real": 2, "ai": 2}}
    assert set(prepared.manifest.path).isdisjoint(bad)
    images, _ = load_split_arrays(prepared, "train", image_size=8, num_workers=1)
    assert len(images) == prepared.summary["counts"]["train"]["ai"] + prepared.summary["counts"]["train"]["real"]


def test_a_file_name_that_is_not_utf8_is_skipped_and_shown_escaped(make_dataset, tmp_path: Path) -> None:
    """Such a name (from an archive made on another system) failed the whole scan: pandas could not hold it."""
    root = make_dataset(train=6, test=2)
    for folder in ("train/FAKE", "train/REAL/caf\udce9"):  # a file, and a folder, named in Latin-1 bytes
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "r\udcf4le.jpg").write_bytes(image_bytes(len(folder)))
    prepared = prepare(root)
    skipped = {entry["path"]: entry["reason"] for entry in prepared.summary["skipped"]}
    assert skipped == {
        "train/FAKE/r\\xf4le.jpg": "file name is not UTF-8: rename the file to use it",
        "train/REAL/caf\\xe9/r\\xf4le.jpg": "file name is not UTF-8: rename the file to use it",
    }
    assert prepared.summary["images_found"]["train"] == {"real": 6, "ai": 6}
    write_split_files(prepared, tmp_path / "splits")
    assert json.loads((tmp_path / "splits" / SUMMARY_FILE).read_text())["skipped"] == prepared.summary["skipped"]


# --- image modes through the dataset path -------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_image_mode_loads_as_uint8_rgb(make_dataset) -> None:
    root = make_dataset(train=4, test=1)
    rng = np.random.default_rng(11)
    colours = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    transparent = np.dstack([colours, np.zeros((32, 32), dtype=np.uint8)])
    files = {
        "grey.png": Image.fromarray(colours).convert("L"),
        "rgba.png": Image.fromarray(transparent, mode="RGBA"),
        "palette.png": Image.fromarray(colours).convert("P"),
        "grey16.png": Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16)),
    }
    for name, image in files.items():
        (root / "test" / "REAL" / name).write_bytes(_png(image))
    modes = {name: Image.open(root / "test" / "REAL" / name).mode for name in files}
    assert modes == {"grey.png": "L", "rgba.png": "RGBA", "palette.png": "P", "grey16.png": "I;16"}

    prepared = prepare(root)
    assert prepared.summary["skipped"] == []
    images, labels = load_split_arrays(prepared, "test", image_size=16, num_workers=1)
    assert images.dtype == np.uint8 and images.shape == (6, 3, 16, 16)
    assert labels.dtype == np.int64
    test_rows = prepared.manifest[prepared.manifest.split == "test"].reset_index(drop=True)
    np.testing.assert_array_equal(labels, (test_rows.label == "ai").to_numpy().astype(np.int64))
    index = {Path(path).name: i for i, path in enumerate(test_rows.path)}
    grey16 = images[index["grey16.png"]].astype(int)
    assert np.all(np.abs(grey16 - 128) <= 1), "a 16-bit mid-grey must be scaled to ~128, not clipped to white"
    assert np.all(images[index["rgba.png"]] == 255), "fully transparent pixels composite on white"
    grey = images[index["grey.png"]]
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[1], grey[2])


# --- decoded-image cache ---------------------------------------------------------------------------------------------


def _refuse_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(task: object) -> None:
        raise AssertionError("decoded an image the cache should have supplied")

    monkeypatch.setattr(data, "_decode", refuse)


def test_a_second_load_maps_the_cache_instead_of_decoding(make_dataset, tmp_path: Path, monkeypatch) -> None:
    prepared, cache = prepare(make_dataset(train=6, test=3)), tmp_path / "cache"
    decoded, labels = load_split_arrays(prepared, "test", 16, num_workers=1, cache_folder=cache)
    assert [path.suffix for path in cache.iterdir()] == [".npy"]  # one file, no temporary left
    _refuse_decoding(monkeypatch)
    mapped, mapped_labels = load_split_arrays(prepared, "test", 16, num_workers=1, cache_folder=cache)
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, decoded)
    np.testing.assert_array_equal(mapped_labels, labels)


def test_changed_images_or_another_size_decode_afresh(make_dataset, tmp_path: Path) -> None:
    root, cache = make_dataset(train=6, test=3), tmp_path / "cache"
    before, _ = load_split_arrays(prepare(root), "test", 16, num_workers=1, cache_folder=cache)
    changed = sorted((root / "test" / "FAKE").iterdir())[0]
    changed.write_bytes(image_bytes(999))
    after, _ = load_split_arrays(prepare(root), "test", 16, num_workers=1, cache_folder=cache)
    assert not np.array_equal(before, after)
    np.testing.assert_array_equal(after, load_split_arrays(prepare(root), "test", 16, num_workers=1)[0])
    resized, _ = load_split_arrays(prepare(root), "test", 8, num_workers=1, cache_folder=cache)
    assert resized.shape[-1] == 8 and len(list(cache.iterdir())) == 3


def test_a_damaged_cache_file_is_decoded_again_and_replaced(make_dataset, tmp_path: Path) -> None:
    prepared, cache = prepare(make_dataset(train=6, test=3)), tmp_path / "cache"
    decoded, _ = load_split_arrays(prepared, "test", 16, num_workers=1, cache_folder=cache)
    [cached] = cache.iterdir()
    cached.write_bytes(cached.read_bytes()[:100])  # truncated, as by a full disk
    again, _ = load_split_arrays(prepared, "test", 16, num_workers=1, cache_folder=cache)
    np.testing.assert_array_equal(again, decoded)
    assert isinstance(load_split_arrays(prepared, "test", 16, num_workers=1, cache_folder=cache)[0], np.memmap)


def test_an_interrupted_cache_write_leaves_nothing_behind(make_dataset, tmp_path: Path, monkeypatch) -> None:
    prepared, cache = prepare(make_dataset(train=6, test=3)), tmp_path / "cache"

    def interrupted(handle: object, images: np.ndarray) -> None:
        handle.write(b"\x93NUMPY half")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_split_arrays(prepared, "test", 16, num_workers=1, cache_folder=cache)
    assert list(cache.iterdir()) == []


def test_an_unwritable_cache_only_costs_a_decode(make_dataset, tmp_path: Path) -> None:
    prepared = prepare(make_dataset(train=6, test=3))
    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    images, _ = load_split_arrays(prepared, "test", 16, num_workers=1, cache_folder=blocked / "cache")
    assert images.shape == (6, 3, 16, 16)


# --- the scan cache ---------------------------------------------------------------------------------------------------


def _prepare_cached(root: Path, cache: Path) -> PreparedData:
    return prepare_splits(root, 0.25, 0, 0, seed=0, num_workers=1, cache_folder=cache)


def _images_found(prepared: PreparedData) -> int:
    return sum(count for split in prepared.summary["images_found"].values() for count in split.values())


@pytest.fixture
def files_settle_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remember files written just now: these tests write their dataset and scan it within milliseconds."""
    monkeypatch.setattr(data, "RACY_NANOSECONDS", 0)


@pytest.mark.usefixtures("files_settle_at_once")
def test_a_second_scan_of_an_unchanged_folder_reads_no_file(make_dataset, tmp_path: Path, monkeypatch) -> None:
    root, cache = make_dataset(train=6, test=3), tmp_path / "scans"
    (root / "train/FAKE/broken.jpg").write_bytes(b"not an image")
    first = _prepare_cached(root, cache)
    assert [path.suffix for path in cache.iterdir()] == [".json"]  # one file, no temporary left

    def refuse(path: Path) -> None:
        raise AssertionError(f"read {path} although it did not change")

    monkeypatch.setattr(data, "_inspect_file", refuse)
    second = _prepare_cached(root, cache)
    pd.testing.assert_frame_equal(second.manifest, first.manifest)
    assert second.summary == first.summary  # the broken file still skipped, with its reason
    assert "train/FAKE/broken.jpg" in {entry["path"] for entry in second.summary["skipped"]}


def _reading_recorder(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    read: list[Path] = []
    inspect = data._inspect_file
    monkeypatch.setattr(data, "_inspect_file", lambda path: read.append(path) or inspect(path))
    return read


@pytest.mark.usefixtures("files_settle_at_once")
def test_only_files_changed_since_the_last_scan_are_read_again(make_dataset, tmp_path: Path, monkeypatch) -> None:
    root, cache = make_dataset(train=6, test=3), tmp_path / "scans"
    first = _prepare_cached(root, cache)
    edited, chmodded = sorted((root / "test" / "REAL").iterdir())[:2]
    edited.write_bytes(image_bytes(4242))
    ctime = chmodded.stat().st_ctime_ns
    os.chmod(chmodded, 0o644)  # content and mtime unchanged, ctime moves: permissions may have changed
    assert chmodded.stat().st_ctime_ns != ctime, "this filesystem's ctime did not move: the test cannot tell"
    read = _reading_recorder(monkeypatch)
    second = _prepare_cached(root, cache)
    assert sorted(read) == [edited, chmodded]
    digests = [
        prepared.manifest.set_index("path").sha256[edited.relative_to(root).as_posix()] for prepared in (first, second)
    ]
    assert digests[1] == hashlib.sha256(image_bytes(4242)).hexdigest() != digests[0]


def test_a_file_written_just_before_a_scan_is_read_again_by_the_next(make_dataset, tmp_path: Path, monkeypatch) -> None:
    root, cache = make_dataset(train=6, test=3), tmp_path / "scans"
    first = _prepare_cached(root, cache)  # within RACY_NANOSECONDS of writing every file: none is remembered
    read = _reading_recorder(monkeypatch)
    second = _prepare_cached(root, cache)
    assert len(read) == _images_found(first)
    pd.testing.assert_frame_equal(second.manifest, first.manifest)


@pytest.mark.usefixtures("files_settle_at_once")
def test_malformed_entries_in_the_scan_cache_are_read_again(make_dataset, tmp_path: Path, monkeypatch) -> None:
    root, cache = make_dataset(train=6, test=3), tmp_path / "scans"
    first = _prepare_cached(root, cache)
    [remembered] = cache.iterdir()
    stored = json.loads(remembered.read_text())
    spoiled = sorted(stored["files"])[:3]
    for relative, (digest, problem) in zip(spoiled, [("", ""), (None, None), ("not a sha256", "")], strict=True):
        stored["files"][relative][3:] = [digest, problem]
    remembered.write_text(json.dumps(stored))
    read = _reading_recorder(monkeypatch)
    second = _prepare_cached(root, cache)
    assert sorted(path.relative_to(root).as_posix() for path in read) == spoiled
    pd.testing.assert_frame_equal(second.manifest, first.manifest)


@pytest.mark.usefixtures("files_settle_at_once")
def test_a_damaged_or_unwritable_scan_cache_only_costs_a_full_scan(make_dataset, tmp_path: Path) -> None:
    root, cache = make_dataset(train=6, test=3), tmp_path / "scans"
    first = _prepare_cached(root, cache)
    [remembered] = cache.iterdir()
    remembered.write_text('{"preprocessing": ')  # cut short, as by a full disk
    pd.testing.assert_frame_equal(_prepare_cached(root, cache).manifest, first.manifest)
    assert len(json.loads(remembered.read_text())["files"]) == _images_found(first)  # written whole again
    blocked = tmp_path / "a file, not a folder"
    blocked.write_text("")
    pd.testing.assert_frame_equal(_prepare_cached(root, blocked / "scans").manifest, first.manifest)


# --- split files ------------------------------------------------------------------------------------------------------


def test_num_workers_minus_one_means_one_process_per_available_core() -> None:
    assert data.worker_count(-1) == len(os.sched_getaffinity(0)) and data.worker_count(3) == 3


def test_split_files_read_back_to_the_same_content_and_leave_no_temporary_files(make_dataset, tmp_path: Path) -> None:
    prepared = prepare(make_dataset(train=6, test=2))
    output = tmp_path / "out" / "nested"
    for _ in range(2):  # a second write replaces the first cleanly
        manifest_path, summary_path = write_split_files(prepared, output)
    assert (manifest_path, summary_path) == (output / MANIFEST_FILE, output / SUMMARY_FILE)
    assert sorted(os.listdir(output)) == sorted([MANIFEST_FILE, SUMMARY_FILE])
    read_back = read_split_files(output)
    pd.testing.assert_frame_equal(read_back.manifest, prepared.manifest)
    assert read_back.summary == prepared.summary and read_back.root == prepared.root


def test_split_files_keep_file_names_a_csv_could_mangle(make_dataset, tmp_path: Path) -> None:
    """The training processes of a launched run train on the split files, not a scan: a name with a comma, quotes,
    a line break, a carriage return or spaces at its ends, or one that reads as a missing value, comes back as
    written."""
    root = make_dataset(train=6, test=2)
    awkward = [
        "a, b.jpg",
        'say "fake".jpg',
        "NA.jpg",
        " spaced .jpg",
        "line\nbreak.jpg",
        "carriage\rreturn.jpg",
        "nan.JPG",
    ]
    for index, name in enumerate(awkward):
        (root / "train" / "FAKE" / name).write_bytes(image_bytes(100 + index))
    prepared = prepare(root)
    assert {f"train/FAKE/{name}" for name in awkward} <= set(prepared.manifest.path)
    write_split_files(prepared, tmp_path / "splits")
    read_back = read_split_files(tmp_path / "splits")
    pd.testing.assert_frame_equal(read_back.manifest, prepared.manifest)
    assert data.fingerprint_manifest(read_back.manifest) == prepared.fingerprint


# --- download -----------------------------------------------------------------------------------------------------


def test_download_fails_fast_offline_and_explains_the_manual_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(data, "host_reachable", lambda *args, **kwargs: False)
    destination = tmp_path / "cifake"
    started = time.monotonic()
    with pytest.raises(DatasetError) as excinfo:
        download_cifake(destination)
    assert time.monotonic() - started < 2.0
    message = str(excinfo.value)
    assert "kaggle.com/datasets/" in message
    assert "unzip" in message
    assert str(destination / "train" / "FAKE") in message


def test_download_without_kaggle_credentials_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import kagglehub
    import kagglehub.config

    for name in list(os.environ):
        if name.startswith("KAGGLE_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(data, "host_reachable", lambda *args, **kwargs: True)
    monkeypatch.setattr(kagglehub.config, "get_kaggle_credentials", lambda: None)

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("download attempted without credentials")

    monkeypatch.setattr(kagglehub, "dataset_download", no_download)
    destination = tmp_path / "cifake"
    with pytest.raises(DatasetError, match="credentials") as excinfo:
        download_cifake(destination)
    assert "KAGGLE_USERNAME" in str(excinfo.value)
    assert str(destination / "train" / "FAKE") in str(excinfo.value)
    assert not destination.exists()
