"""Atomic file writes, below every layer: readers see the old file or the new one, never a part.

The store, the launched job and the reports all write through here, so no lower layer imports the store for it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_text_atomic", "write_bytes_atomic", "fsync_dir"]


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` through a uniquely named temp file beside it, fsync and rename (the parent folder is
    created if missing). Two writers of one path never share a temp file: the last rename wins, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """`write_bytes_atomic` of `text` in UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
