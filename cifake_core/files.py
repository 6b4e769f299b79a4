"""Atomic file writes: write to a temporary name beside the target, then rename, so a crash or Ctrl-C
never leaves a half-written file under the real name.

Usage:
    with atomic_path(folder / "metrics.json") as temporary:
        temporary.write_text(text)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write; it replaces `path` only if the block finishes without an exception."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
