"""Before training: the dataset found (or the demo data made), scanned into splits and checked against memory, and
`cifake train`'s processes started with those splits.

No MLflow, timm or torchvision is imported here, so `cifake train` checks its data and starts its training
processes without first loading what only they use (about 10 s of imports on a 2-core CPU).

Usage:
    root, name = resolve_dataset("/data/cifake")
    prepared = prepare(root, name, DataConfig(data_dir="/data/cifake"), num_workers=-1)
    exit_status = launch_training(config, processes=2, arguments=["train", "--data_dir", "/data/cifake"])
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cifake_core import distributed
from cifake_core.config import DataConfig, RunConfig
from cifake_core.data import (
    PreparedData,
    find_dataset_root,
    fingerprint_manifest,
    prepare_splits,
    read_split_files,
    scan_cache_folder,
    write_split_files,
)
from cifake_core.demo import DEMO_VERSION, ensure_demo_dataset
from cifake_core.errors import LAUNCH_FOLDER_VARIABLE, DatasetError

# Decoded splits live in memory (on the device when it is a GPU); leave the rest of RAM to the model and OS.
MAX_SHARE_OF_MEMORY_FOR_IMAGES = 0.5
# The data settings that shape the splits, each recorded in their summary.
_SPLIT_SETTINGS = ("val_fraction", "max_train_per_class", "max_test_per_class", "seed")
log = logging.getLogger(__name__)


def resolve_dataset(data_dir: str) -> tuple[Path, str]:
    """The dataset root and its display name; an empty data_dir means the embedded demo data."""
    if not data_dir:
        return ensure_demo_dataset(), f"{DEMO_VERSION} (synthetic demo data, not CIFAKE)"
    root = find_dataset_root(data_dir)
    return root, root.name


def prepare(root: Path, name: str, data: DataConfig, num_workers: int) -> PreparedData:
    log.info("scanning %s (%s)", root, name)
    return prepare_splits(
        root,
        data.val_fraction,
        data.max_train_per_class,
        data.max_test_per_class,
        data.seed,
        num_workers,
        dataset_name=name,
        cache_folder=scan_cache_folder(),
    )


def check_memory(image_count: int, image_size: int) -> None:
    """Refuse, before decoding, splits that would not fit in memory as uint8 tensors."""
    needed = image_count * 3 * image_size * image_size
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if needed > MAX_SHARE_OF_MEMORY_FOR_IMAGES * available:
        raise DatasetError(
            f"{image_count:,} images at image_size={image_size} need {needed / 2**30:.1f} GiB in memory, more than "
            f"half of the {available / 2**30:.1f} GiB free: lower image_size or cap max_train_per_class"
        )


def launch_training(config: RunConfig, processes: int, arguments: Sequence[str]) -> int:
    """`cifake ARGUMENTS` (a `train`) as `processes` processes of one torchrun group, after the checks `train` makes
    of its data (the folder, every file, the splits, the memory), made here once: a mistake is then one message from
    this process, not one from each process amid torchrun's report, and the processes read the splits made here
    instead of each scanning the dataset again, one after another (about 4 s a scan of CIFAKE). Returns torchrun's
    exit status."""
    return distributed.run_processes(processes, arguments, _launch_folder_with_splits(config))


def _launch_folder_with_splits(config: RunConfig) -> Path:
    """A new temporary folder holding the splits of `config`'s data, checked first."""
    root, name = resolve_dataset(config.data.data_dir)
    prepared = prepare(root, name, config.data, config.train.num_workers)
    check_memory(len(prepared.manifest), config.model.image_size)
    folder = Path(tempfile.mkdtemp(prefix="cifake-launch-"))
    try:
        write_split_files(prepared, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def launch_folder() -> str | None:
    """The launch folder of this process's group, if `launch_training` started it, else None. torchrun's wrapper
    removes the folder when the group ends, so a work folder made in it goes too when its process is killed
    outright (by the out-of-memory killer), where it was left in the system's temporary folder."""
    folder = os.environ.get(LAUNCH_FOLDER_VARIABLE)
    return folder if folder and distributed.launched_by_torchrun() and os.path.isdir(folder) else None


def launcher_splits(root: Path, data: DataConfig) -> PreparedData | None:
    """The splits `launch_training` made for this process's group, if it made them, they read back whole and they
    were made from `data` in `root`; else None."""
    folder = launch_folder()
    if folder is None:
        return None
    splits = read_split_files(Path(folder))
    made_for = {"root": str(root)} | {key: getattr(data, key) for key in _SPLIT_SETTINGS}
    if fingerprint_manifest(splits.manifest) == splits.fingerprint and all(
        splits.summary[key] == value for key, value in made_for.items()
    ):
        return splits
    # The file names' round trip through a CSV is the fragile part (a carriage return broke it once); a scan holds.
    log.warning("the launcher's splits in %s do not read back as made for this run: scanning the data", folder)
    return None
