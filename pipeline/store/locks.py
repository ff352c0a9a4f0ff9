"""The store's locks: a writer's lock on its temp folder, and the compute lock of one key.

A writer holds an exclusive `flock` on `.tmp-<key>-<random>.lock` while its temp folder `.tmp-<key>-<random>`
exists. The kernel drops the lock when the process dies (kill -9 included), so a cleaner removes exactly the temp
folders whose lock is free and leaves the ones of live writers (other threads or processes) alone.

Computing a key is serialised by `.compute-<key>.lock`: a caller that finds no output takes it, waiting while
another thread, process or machine on the same root holds it, then looks the output up again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.store.manifests import ArtifactError

__all__ = ["TempLock", "try_lock", "new_lock", "compute_lock", "remove", "LockError"]

log = logging.getLogger(__name__)


class LockError(ArtifactError):
    """A writer lock that could not be taken; the message names the folder and key."""


@dataclass
class TempLock:
    """An exclusive flock on `.tmp-<token>.lock`, held while the temp folder `.tmp-<token>` exists."""

    lock_path: Path
    fd: int

    @property
    def temp_folder(self) -> Path:
        return self.lock_path.with_suffix("")

    def release(self) -> None:
        self.lock_path.unlink(missing_ok=True)
        os.close(self.fd)


def try_lock(lock_path: Path) -> TempLock | None:
    """The lock if it is free (or its file is gone), None while another writer holds it."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileNotFoundError:
        return None  # the stage folder itself vanished
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return TempLock(lock_path, fd)


def new_lock(folder: Path, key: str) -> TempLock:
    """Hold the lock of a fresh temp token `<key>-<random>` in `folder`. A cleaner may take and unlink a lock file
    between our open and our flock, leaving us an orphaned inode: check that the path still names our file."""
    for _ in range(3):
        lock = try_lock(folder / f".tmp-{key}-{secrets.token_hex(6)}.lock")
        if lock is not None and _still_linked(lock):
            return lock
        if lock is not None:
            os.close(lock.fd)
    raise LockError(f"{folder}: could not take a writer lock for key {key!r}")


def _still_linked(lock: TempLock) -> bool:
    try:
        return os.fstat(lock.fd).st_ino == lock.lock_path.stat().st_ino
    except FileNotFoundError:
        return False


@contextmanager
def compute_lock(folder: Path, key: str, what: str) -> Iterator[None]:
    """Hold `folder/.compute-<key>.lock` exclusively, waiting while another holder has it. The lock file stays
    (removing it could let two writers lock two different files); the kernel drops the lock when its holder dies."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f".compute-{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another writer is computing it; waiting for it", what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def remove(path: Path) -> bool:
    """Remove a folder or file if it exists; True when something was removed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    else:
        return False
    return True
