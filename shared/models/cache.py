"""Where prepared models live, and the cross-process lock that guards preparing one."""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("pice.startup")

CACHE_ENV = "PICE_CACHE_DIR"


def default_cache_dir() -> Path:
    """$PICE_CACHE_DIR when set (and non-empty), else ~/.cache/pice."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pice"


def gguf_dir(cache_dir: Path) -> Path:
    return cache_dir / "gguf"


def models_dir(cache_dir: Path) -> Path:
    return cache_dir / "models"


@contextmanager
def file_lock(lock_dir: Path, name: str) -> Iterator[None]:
    """Hold an exclusive flock on `<lock_dir>/.lock-<name>` for the duration of the block.

    flock (not a lock-file-exists check) so that a crashed holder releases the lock with its
    process instead of leaving a stale file that blocks everyone. The lock file itself is kept:
    unlinking it would let a late waiter lock an orphaned inode while a newcomer locks a new one.
    Locks are per open file, so a process must not nest two locks on the same name.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f".lock-{name}", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextmanager
def stage(what: str, name: str, nbytes: int | None = None) -> Iterator[None]:
    """One start-up stage a user can watch: a line when it starts (with its size) and one when
    it ends (with the elapsed time), so no minute of a start is silent."""
    size = f" ({nbytes / 1e9:.2f} GB)" if nbytes else ""
    log.info("%s %s%s ...", what, name, size)
    t0 = time.perf_counter()
    yield
    log.info("%s %s%s: done in %.1f s", what, name, size, time.perf_counter() - t0)
