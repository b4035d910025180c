"""Kernel builds survive a build that died half-way and never wait without a deadline."""

import fcntl
import subprocess
import sys

import pytest

from pice.kernels.build import build_dir, load_extension

HANG_GUARD_S = 1800  # a cold build on a loaded 2-core machine takes minutes; only a hang fails

LOAD = """
import logging
logging.basicConfig(level=logging.WARNING)
from pice.kernels.quant_linear import load_quant_kernel
assert load_quant_kernel() is not None, "kernel did not load"
print("loaded")
"""


def test_a_lock_left_by_a_dead_build_does_not_hang_the_next_start() -> None:
    where = build_dir("pice_quant_linear")
    where.mkdir(parents=True, exist_ok=True)
    (where / "lock").touch()  # what torch's baton leaves when its builder is killed
    out = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True,
                         timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stderr
    assert "loaded" in out.stdout
    assert "removing a lock left by a build that died" in out.stderr
    assert not (where / "lock").exists()


def test_a_build_held_elsewhere_is_waited_for_with_a_deadline() -> None:
    where = build_dir("pice_quant_linear")
    where.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time\n"
         f"f = open({str(where / '.pice-build.flock')!r}, 'w')\n"
         "fcntl.flock(f, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match="another process"):
            load_extension("pice_quant_linear", wait_s=1.0, sources=[])
    finally:
        holder.kill()
        holder.wait()
    # the kernel drops a dead holder's flock: the build is free again
    with open(where / ".pice-build.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
