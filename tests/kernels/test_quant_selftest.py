"""The SIMD backends' torch-free self-test (csrc/quant/selftest.cpp): this machine's backend
natively, and the aarch64 NEON backend cross-compiled and run under qemu-user (Debian packages
g++-aarch64-linux-gnu and qemu-user; .ci/run installs them), so the Jetson / Raspberry Pi path
is tested on x86 CI."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

import pice.kernels as kernels_pkg

SRC = Path(kernels_pkg.__file__).parent / "csrc" / "quant"
SOURCES = [str(SRC / f) for f in ("selftest.cpp", "portable.cpp", "avx2.cpp", "neon.cpp")]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_native_backend(tmp_path: Path) -> None:
    backend = {"x86_64": "avx2", "aarch64": "neon"}.get(platform.machine())
    if backend is None:
        pytest.skip(f"no SIMD backend for {platform.machine()}")
    exe = tmp_path / "selftest"
    build = _run(["g++", "-O2", "-std=c++17", "-o", str(exe), *SOURCES])
    assert build.returncode == 0, build.stderr
    out = _run([str(exe), backend])
    if out.returncode == 2:
        pytest.skip(out.stdout.strip())  # e.g. an x86 CPU without AVX2
    assert out.returncode == 0, out.stdout
    assert "0 failed" in out.stdout


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None
                    or shutil.which("qemu-aarch64") is None,
                    reason="needs g++-aarch64-linux-gnu and qemu-user")
def test_neon_backend_under_qemu(tmp_path: Path) -> None:
    exe = tmp_path / "selftest-aarch64"
    build = _run(["aarch64-linux-gnu-g++", "-O2", "-std=c++17", "-static", "-o", str(exe),
                  *SOURCES])
    assert build.returncode == 0, build.stderr
    out = _run(["qemu-aarch64", "-cpu", "max", str(exe), "neon"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failed" in out.stdout
