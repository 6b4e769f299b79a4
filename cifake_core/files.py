"""Atomic file writes (write to a temporary name beside the target, then rename, so a crash or Ctrl-C never
leaves a half-written file under the real name), the project's cache folder, and file names as text.

Usage:
    with atomic_path(folder / "metrics.json") as temporary:
        temporary.write_text(text)
    arrays = cache_dir() / "arrays"
    shown = printable_name(str(path))
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

CACHE_DIR_ENV = "CIFAKE_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("~/.cache/cifake")


def cache_dir() -> Path:
    """$CIFAKE_CACHE_DIR if that variable is set, else ~/.cache/cifake: the demo dataset and decoded arrays."""
    base = os.environ.get(CACHE_DIR_ENV)
    return (Path(base) if base else DEFAULT_CACHE_DIR).expanduser()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write; it replaces `path` only if the block finishes without an exception."""
    # The process id keeps two processes writing the same file (two runs filling one cache) apart.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def printable_name(name: str) -> str:
    """`name` as UTF-8 text: a file name's bytes that are not UTF-8 (which Python keeps as lone surrogates, and
    which a CSV, a table or a terminal cannot encode) shown as escapes, `bad\\xff.jpg`; other names unchanged."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
