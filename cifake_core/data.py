"""Datasets in the CIFAKE layout: verify, download, split into a manifest, and decode into arrays.

A dataset root holds `train/FAKE`, `train/REAL`, `test/FAKE` and `test/REAL` (class `ai` = FAKE, `real` =
REAL), possibly one folder down as the Kaggle zip unpacks. Splits are never copied: a manifest lists
(path, label, split, sha256) and `dataset_summary.json` says how it was built. Exact duplicates are found
by content hash: inside a split one copy is kept, and a train image whose bytes also occur in test is
dropped from train, so the test split stays the published one and holds nothing the model trained on.
Unreadable images, and files whose names are not UTF-8, are skipped and listed, never fatal. Each file's hash
and check are remembered by path, size and times (`scan_cache_folder()`), so a later scan of an unchanged folder
reads no image; decoded splits are cached as uint8 `.npy` files (`array_cache_folder()`), keyed by their content,
and memory-mapped.

Usage:
    prepared = prepare_splits(find_dataset_root("/data/cifake"), val_fraction=0.1, max_train_per_class=0,
                              max_test_per_class=0, seed=42, num_workers=2, cache_folder=scan_cache_folder())
    images, labels = load_split_arrays(prepared, "train", 32, num_workers=2, cache_folder=array_cache_folder())
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import stat
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cifake_core import CLASS_NAMES, FOLDER_FOR_CLASS
from cifake_core.errors import DatasetError, ImageError
from cifake_core.files import atomic_path, cache_dir, printable_name
from cifake_core.network import host_reachable
from cifake_core.preprocessing import PREPROCESSING_VERSION, load_rgb, preprocess_image

SOURCE_SPLITS = ("train", "test")
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
KAGGLE_HANDLE = "birdy654/cifake-real-and-ai-generated-synthetic-images"
KAGGLE_PAGE = "https://www.kaggle.com/datasets/" + KAGGLE_HANDLE
MANIFEST_FILE = "manifest.csv"
SUMMARY_FILE = "dataset_summary.json"
_CHUNK = 256
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A file written this shortly before a scan may share its timestamps with a rewrite just after it on a filesystem
# with coarse times (git's "racily clean" entries): its check is not remembered until it is older.
RACY_NANOSECONDS = 2_000_000_000
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    root: Path
    manifest: pd.DataFrame  # columns: path (relative to root), label, split, sha256
    summary: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.summary["fingerprint"]


def _expected_folders(root: Path) -> list[Path]:
    return [root / split / FOLDER_FOR_CLASS[label] for split in SOURCE_SPLITS for label in reversed(CLASS_NAMES)]


def _has_images(folder: Path) -> bool:
    return any(path.suffix.lower() in IMAGE_EXTENSIONS for path in folder.rglob("*") if path.is_file())


def find_dataset_root(path: str | Path) -> Path:
    """The folder holding train/ and test/ (the given one, or one level down); raise DatasetError otherwise."""
    given = Path(path).expanduser()
    if given.is_file():
        raise DatasetError(
            f"data_dir {str(given)!r} is a file, not a folder: unpack it first (e.g. `tar xzf {given.name}` or "
            "`unzip`) and pass the folder that holds train/ and test/"
        )
    if not given.is_dir():
        raise DatasetError(
            f"dataset folder {str(given)!r} does not exist. Pass the folder that holds train/ and test/ "
            f"(get CIFAKE with `cifake data download {given}` or unzip a manual download there)."
        )
    candidates = [given] + sorted(child for child in given.iterdir() if child.is_dir())
    root = next((c for c in candidates if (c / "train").is_dir() and (c / "test").is_dir()), given)
    for folder in _expected_folders(root):
        if not folder.is_dir():
            expected = ", ".join(str(f) for f in _expected_folders(root))
            raise DatasetError(
                f"missing folder {str(folder)!r}: a dataset in the CIFAKE layout needs {expected} "
                "(FAKE = AI-generated images, REAL = photographs)."
            )
        if not _has_images(folder):
            raise DatasetError(
                f"folder {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}): "
                "put the images of that class there."
            )
    return root


def _inspect_file(path: Path) -> tuple[str, str]:
    """(sha256, problem) of one file; problem is empty when the image decodes."""
    try:
        content = path.read_bytes()
    except OSError as error:  # unreadable (permissions) or gone since the folder was listed
        return "", f"unreadable file: {error.strerror or error}"
    digest = hashlib.sha256(content).hexdigest()
    try:
        load_rgb(content)
    except ImageError as error:
        return digest, str(error)
    return digest, ""


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, as `taskset` or a container sets it; all of them where
    the platform has no affinity, as on macOS)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(num_workers: int) -> int:
    """`num_workers` as a number of processes: -1 means one per CPU core this process may run on."""
    return usable_cores() if num_workers == -1 else num_workers


def _parallel_map(function: Callable, items: Sequence, num_workers: int) -> Iterable:
    num_workers = worker_count(num_workers)
    if num_workers <= 1 or len(items) < 4 * _CHUNK:
        return map(function, items)
    # Spawned, not forked: the parent may already run torch's thread pools, which do not survive a fork.
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(max_workers=num_workers, mp_context=context)
    try:
        return list(executor.map(function, items, chunksize=_CHUNK))
    finally:
        # On Ctrl-C, drop the queued chunks instead of finishing a scan of 100k files first.
        executor.shutdown(wait=True, cancel_futures=True)


def scan_cache_folder() -> Path:
    """Where scans remember each file's hash and check: `scans` in $CIFAKE_CACHE_DIR (default ~/.cache/cifake);
    safe to delete."""
    return cache_dir() / "scans"


def _listed_files(folder: Path) -> list[tuple[str, list[int]]]:
    """Every regular file under `folder` (links to files included, links to folders not followed, as pathlib's
    `rglob`) as its path relative to `folder`, in `Path` order, with its scan-cache key: one stat per file serves
    both. Strings from `os.scandir`: pathlib's objects took 5 of the 6 seconds of a warm scan of CIFAKE."""
    listed: list[tuple[tuple[str, ...], list[int]]] = []
    pending: list[tuple[str, ...]] = [()]
    while pending:
        parts = pending.pop()
        try:
            entries = list(os.scandir(os.path.join(folder, *parts)))
        except OSError:  # unreadable, or gone since its parent was listed
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append((*parts, entry.name))
                    continue
                status = entry.stat()
            except OSError:  # a dangling link, or a file gone since the folder was listed
                continue
            if stat.S_ISREG(status.st_mode):
                # ctime too: a chmod that makes a file unreadable changes it and leaves the mtime alone.
                listed.append(((*parts, entry.name), [status.st_size, status.st_mtime_ns, status.st_ctime_ns]))
    listed.sort(key=lambda item: item[0])  # by parts, as `Path` sorts: a duplicate's first copy is the one kept
    return [("/".join(parts), key) for parts, key in listed]


def _read_inspections(path: Path) -> dict[str, list]:
    """{relative path: [size, mtime_ns, ctime_ns, sha256, problem]} from an earlier scan; {} if absent, damaged or
    stale."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    # A new decoder may accept or refuse other files, so a check made by an older one is not reused.
    fresh = isinstance(stored, dict) and stored.get("preprocessing") == PREPROCESSING_VERSION
    return stored["files"] if fresh and isinstance(stored.get("files"), dict) else {}


def _reusable(entry: object, key: list[int]) -> bool:
    """Whether a remembered entry is well-formed and belongs to a file with exactly these size and times."""
    return (
        isinstance(entry, list)
        and len(entry) == 5
        and entry[:3] == key
        and isinstance(entry[3], str)
        and _SHA256.fullmatch(entry[3]) is not None
        and isinstance(entry[4], str)
    )


def _write_inspections(path: Path, files: dict[str, list]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as temporary:
            temporary.write_text(json.dumps({"preprocessing": PREPROCESSING_VERSION, "files": files}))
    except OSError as error:  # a read-only or full disk costs a full scan next time, not this run
        log.warning("could not remember this scan in %s (%s); the next scan reads every file again", path, error)


def _inspect_all(
    root: Path, relatives: list[str], keys: list[list[int]], num_workers: int, cache_folder: Path | None
) -> list[tuple[str, str]]:
    """`_inspect_file` of every file (`relatives`: paths relative to `root`; `keys`: their size and times); with
    `cache_folder`, only of the files whose key changed since the last scan of `root`, remembering the results."""
    if cache_folder is None:
        return list(_parallel_map(_inspect_file, [root / relative for relative in relatives], num_workers))
    cache_file = cache_folder / f"{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]}.json"
    known = _read_inspections(cache_file)
    settled_before = time.time_ns() - RACY_NANOSECONDS
    results: list[tuple[str, str] | None] = []
    for relative, key in zip(relatives, keys, strict=True):
        entry = known.get(relative)
        results.append((entry[3], entry[4]) if _reusable(entry, key) else None)
    stale = [index for index, result in enumerate(results) if result is None]
    stale_paths = [root / relatives[index] for index in stale]
    for index, result in zip(stale, _parallel_map(_inspect_file, stale_paths, num_workers), strict=True):
        results[index] = result
    if stale:
        # An unreadable file (no digest) is not remembered: permissions may be fixed without touching its mtime.
        remembered = {
            relative: [*key, digest, problem]
            for relative, key, (digest, problem) in zip(relatives, keys, results, strict=True)
            if digest and max(key[1:]) < settled_before
        }
        _write_inspections(cache_file, remembered)
    return results


def _scan(
    root: Path, num_workers: int, cache_folder: Path | None
) -> tuple[list[dict[str, str]], list[dict[str, str]], dict]:
    """Every readable image file under the four folders, the skipped files with reasons, and raw counts."""
    candidates: list[tuple[str, str, str, list[int]]] = []
    skipped: list[dict[str, str]] = []
    for source in SOURCE_SPLITS:
        for label in CLASS_NAMES:
            folder = f"{source}/{FOLDER_FOR_CLASS[label]}"
            for inside, key in _listed_files(root / folder):
                relative = f"{folder}/{inside}"
                shown = printable_name(relative)
                if shown != relative:  # the manifest, a CSV, and every table after it hold text
                    skipped.append({"path": shown, "reason": "file name is not UTF-8: rename the file to use it"})
                elif os.path.splitext(inside)[1].lower() in IMAGE_EXTENSIONS:
                    candidates.append((source, label, relative, key))
                else:
                    skipped.append({"path": relative, "reason": "not an image file extension"})
    relatives = [candidate[2] for candidate in candidates]
    keys = [candidate[3] for candidate in candidates]
    inspections = _inspect_all(root, relatives, keys, num_workers, cache_folder)
    records: list[dict[str, str]] = []
    found: dict[str, dict[str, int]] = {source: dict.fromkeys(CLASS_NAMES, 0) for source in SOURCE_SPLITS}
    for (source, label, relative, _), (digest, problem) in zip(candidates, inspections, strict=True):
        if problem:
            skipped.append({"path": relative, "reason": problem})
            continue
        found[source][label] += 1
        records.append({"path": relative, "label": label, "split": source, "sha256": digest})
    return records, skipped, found


def _deduplicate(records: list[dict[str, str]]) -> tuple[list[dict[str, str]], dict[str, int]]:
    """One copy per content hash inside each split; copies in train of test images dropped from train."""
    kept: list[dict[str, str]] = []
    counts = {"within_train": 0, "within_test": 0, "conflicting_labels": 0, "train_copies_of_test_dropped": 0}
    for source in SOURCE_SPLITS:
        by_hash: dict[str, list[dict[str, str]]] = defaultdict(list)
        for record in records:
            if record["split"] == source:
                by_hash[record["sha256"]].append(record)
        for copies in by_hash.values():
            if len({copy["label"] for copy in copies}) > 1:
                # The same bytes filed as both FAKE and REAL cannot teach anything: drop every copy.
                counts["conflicting_labels"] += len(copies)
                continue
            counts[f"within_{source}"] += len(copies) - 1
            kept.append(copies[0])
    test_hashes = {record["sha256"] for record in kept if record["split"] == "test"}
    leaked = [r for r in kept if r["split"] == "train" and r["sha256"] in test_hashes]
    counts["train_copies_of_test_dropped"] = len(leaked)
    leaked_ids = {id(record) for record in leaked}
    return [r for r in kept if id(r) not in leaked_ids], counts


def _cap(records: list[dict[str, str]], cap: int, rng: np.random.Generator) -> list[dict[str, str]]:
    if cap <= 0 or len(records) <= cap:
        return records
    chosen = np.sort(rng.permutation(len(records))[:cap])
    return [records[i] for i in chosen]


def _assign_splits(
    records: list[dict[str, str]], val_fraction: float, max_train_per_class: int, max_test_per_class: int, seed: int
) -> list[dict[str, str]]:
    assigned: list[dict[str, str]] = []
    for source_index, source in enumerate(SOURCE_SPLITS):
        for label_index, label in enumerate(CLASS_NAMES):
            # One generator per (split, class), so changing one cap never reshuffles another group.
            rng = np.random.default_rng([seed, source_index, label_index])
            group = sorted(
                (r for r in records if r["split"] == source and r["label"] == label), key=lambda r: r["path"]
            )
            group = _cap(group, max_train_per_class if source == "train" else max_test_per_class, rng)
            if source == "test":
                assigned.extend(group)
                continue
            n_val = int(round(len(group) * val_fraction))
            if len(group) < 2 or n_val < 1:
                raise DatasetError(
                    f"too few {label} images in train ({len(group)}) to hold out a validation share of "
                    f"{val_fraction}: add images or raise val_fraction"
                )
            val_positions = set(rng.permutation(len(group))[:n_val].tolist())
            for position, record in enumerate(group):
                assigned.append({**record, "split": "val" if position in val_positions else "train"})
    return assigned


def fingerprint_manifest(manifest: pd.DataFrame) -> str:
    """A content fingerprint of the splits: changes with any image's bytes, label or split, not its path."""
    lines = sorted(f"{row.split},{row.label},{row.sha256}" for row in manifest.itertuples(index=False))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def prepare_splits(
    root: Path,
    val_fraction: float,
    max_train_per_class: int,
    max_test_per_class: int,
    seed: int,
    num_workers: int,
    dataset_name: str | None = None,
    cache_folder: Path | None = None,
) -> PreparedData:
    """Scan, deduplicate, cap and split a verified dataset root; the same inputs and seed give the same result.
    With `cache_folder`, files unchanged since an earlier scan of the same root are not read again."""
    records, skipped, found = _scan(root, num_workers, cache_folder)
    unique, duplicates = _deduplicate(records)
    assigned = _assign_splits(unique, val_fraction, max_train_per_class, max_test_per_class, seed)
    manifest = pd.DataFrame(assigned, columns=["path", "label", "split", "sha256"])
    manifest = manifest.sort_values(["split", "label", "path"], kind="stable").reset_index(drop=True)
    counts = {
        split: {label: int(((manifest.split == split) & (manifest.label == label)).sum()) for label in CLASS_NAMES}
        for split in SPLITS
    }
    for split in SPLITS:
        for label in CLASS_NAMES:
            if counts[split][label] == 0:
                raise DatasetError(f"the {split} split has no {label} images after deduplication and caps")
    summary = {
        "dataset": dataset_name or root.name,
        "root": str(root),
        "fingerprint": fingerprint_manifest(manifest),
        "counts": counts,
        "images_found": found,
        "duplicates": duplicates,
        "skipped_count": len(skipped),
        "skipped": skipped,
        "val_fraction": val_fraction,
        "max_train_per_class": max_train_per_class,
        "max_test_per_class": max_test_per_class,
        "seed": seed,
    }
    return PreparedData(root=root, manifest=manifest, summary=summary)


def write_split_files(prepared: PreparedData, output_dir: Path) -> tuple[Path, Path]:
    """`manifest.csv` and `dataset_summary.json` in output_dir, each written atomically."""
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest_path, summary_path = output_dir / MANIFEST_FILE, output_dir / SUMMARY_FILE
    with atomic_path(manifest_path) as temporary:
        # Every field quoted: unquoted, a carriage return in a file name read back as a line break.
        prepared.manifest.to_csv(temporary, index=False, quoting=csv.QUOTE_ALL)
    with atomic_path(summary_path) as temporary:
        temporary.write_text(json.dumps(prepared.summary, indent=2) + "\n")
    return manifest_path, summary_path


def read_split_files(folder: Path) -> PreparedData:
    """The splits that `write_split_files` wrote to folder."""
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    manifest = pd.read_csv(folder / MANIFEST_FILE, dtype=str, keep_default_na=False)
    return PreparedData(root=Path(summary["root"]), manifest=manifest, summary=summary)


def _decode(task: tuple[str, int]) -> np.ndarray:
    path, image_size = task
    return preprocess_image(path, image_size)


def array_cache_folder() -> Path:
    """Where decoded splits are cached: `arrays` in $CIFAKE_CACHE_DIR (default ~/.cache/cifake); safe to delete."""
    return cache_dir() / "arrays"


def _split_cache_key(rows: pd.DataFrame, image_size: int) -> str:
    # The split's images in order (their content hashes), the size and the preprocessing: any change to one of
    # them (an image edited, added or removed; another cap, seed or size; new preprocessing) is another key.
    content = hashlib.sha256("\n".join(rows.sha256).encode()).hexdigest()[:16]
    return f"{content}-{image_size}px-p{PREPROCESSING_VERSION}"


def _read_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached images memory-mapped (copy-on-write: pages are shared until written), or None if absent or bad."""
    try:
        images = np.load(path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    return images if images.shape == shape and images.dtype == np.uint8 else None


def _write_cached(path: Path, images: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < 2 * images.nbytes:  # a cache must never be what fills a disk
            log.warning(
                "not caching %.0f MB of decoded images: %.0f MB free in %s",
                images.nbytes / 2**20,
                free / 2**20,
                path.parent,
            )
            return
        with atomic_path(path) as temporary, temporary.open("wb") as handle:
            np.save(handle, images)
    except OSError as error:  # a full or read-only disk costs a decode next time, not this run
        log.warning("could not cache decoded images in %s (%s); the next run decodes them again", path, error)


def load_split_arrays(
    prepared: PreparedData, split: str, image_size: int, num_workers: int, cache_folder: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one split once into uint8 images (N, 3, S, S) and int64 labels (1 = ai), in manifest order.

    With `cache_folder`, the decoded images are saved there (atomically) and a later call for the same images
    at the same size memory-maps them instead of decoding again."""
    rows = prepared.manifest[prepared.manifest.split == split]
    labels = (rows.label.to_numpy() == CLASS_NAMES[1]).astype(np.int64)
    shape = (len(rows), 3, image_size, image_size)
    cached = cache_folder / f"{split}-{_split_cache_key(rows, image_size)}.npy" if cache_folder else None
    if cached is not None and (images := _read_cached(cached, shape)) is not None:
        log.info("%s: %d decoded images from the cache %s", split, len(rows), cached)
        return images, labels
    tasks = [(str(prepared.root / path), image_size) for path in rows.path]
    images = np.empty(shape, dtype=np.uint8)
    for index, array in enumerate(_parallel_map(_decode, tasks, num_workers)):
        images[index] = array
    if cached is not None:
        _write_cached(cached, images)
    return images, labels


def download_cifake(destination: Path) -> Path:
    """Fetch CIFAKE from Kaggle with kagglehub into `destination`; fail within seconds offline or without keys."""
    manual = (
        f"Download it by hand from {KAGGLE_PAGE} and unzip it into {destination} so that "
        f"{destination / 'train' / 'FAKE'} exists, then pass data_dir={destination}."
    )
    if not host_reachable("www.kaggle.com"):
        raise DatasetError(f"cannot reach www.kaggle.com (offline?). {manual}")
    import kagglehub
    from kagglehub.config import get_kaggle_credentials

    try:
        credentials = get_kaggle_credentials()
    except Exception as error:
        raise DatasetError(f"unreadable Kaggle credentials ({error}). {manual}") from error
    if credentials is None:
        raise DatasetError(
            "no Kaggle credentials: set KAGGLE_USERNAME and KAGGLE_KEY, or KAGGLE_API_TOKEN, or put kaggle.json "
            f"in ~/.kaggle (see https://www.kaggle.com/settings, 'Create New Token'). {manual}"
        )
    destination.mkdir(parents=True, exist_ok=True)
    try:
        downloaded = Path(kagglehub.dataset_download(KAGGLE_HANDLE, output_dir=str(destination)))
    except Exception as error:  # HTTP 401/403 (terms not accepted), a dropped connection, a bad kaggle.json
        raise DatasetError(f"the Kaggle download failed: {type(error).__name__}: {error}. {manual}") from error
    return find_dataset_root(downloaded)
