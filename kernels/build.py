"""Build-on-first-use of the C++ kernels, safe against a build that died half-way.

torch's `cpp_extension.load` guards its build directory with a lock file that it deletes when it
is done; a process killed mid-build leaves that file behind and every later start waits on it for
ever. Builds here are serialised by an `flock` instead (the kernel drops it when its holder dies),
and whoever holds it clears a leftover torch lock first: no other pice build can be running."""

from __future__ import annotations

import fcntl
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUILD_WAIT_S = 1800.0  # longest wait for another process's build (a cold build takes minutes)


def build_dir(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def load_extension(name: str, wait_s: float = BUILD_WAIT_S, **kwargs: Any) -> Any:
    """`torch.utils.cpp_extension.load(name, **kwargs)` under an flock on its build directory;
    raises TimeoutError when another process holds the build for longer than `wait_s`."""
    from torch.utils.cpp_extension import load

    where = build_dir(name)
    where.mkdir(parents=True, exist_ok=True)
    with open(where / ".pice-build.flock", "w") as guard:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name}: another process has been building it for more "
                                       f"than {wait_s:.0f}s") from None
                time.sleep(0.5)
        try:
            stale = where / "lock"  # torch's baton: nobody else can be building now
            if stale.exists():
                log.warning("%s: removing a lock left by a build that died (%s)", name, stale)
                stale.unlink(missing_ok=True)
            built = any(where.glob(f"{name}*.so"))
            if not built:  # a start a user can watch: a compile is a silent minute otherwise
                log.info("compiling C++ kernel %s (first start only; about 20 s on 2 cores) ...",
                         name)
            t0 = time.monotonic()
            ext = load(name=name, build_directory=str(where), **kwargs)
            if not built or time.monotonic() - t0 > 5:
                log.info("C++ kernel %s ready in %.1f s", name, time.monotonic() - t0)
            return ext
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


__all__ = ["BUILD_WAIT_S", "build_dir", "load_extension"]
