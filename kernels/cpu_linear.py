"""Fast fp32 linear layers for CPU decode: a small AVX2/FMA kernel (csrc/skinny_linear.cpp),
compiled on first use with torch's cpp_extension and cached. MKL's GEMM reaches 9–23 GB/s of
weight traffic on skinny decode shapes on our 2-core machines; this kernel reaches 24–52 GB/s
(measured: 1.7–2.9× at M = 1–8). Where it cannot be built (no compiler, no AVX2/FMA, not
x86-64) every layer keeps torch's path; the fallback is logged once, not silent."""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MAX_ROWS = 16  # above this, MKL's blocked GEMM is the better kernel (prefill)
_SOURCE = Path(__file__).with_name("csrc") / "skinny_linear.cpp"


def _cpu_has_avx2_fma() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@functools.cache
def load_kernel() -> Any | None:
    """The compiled extension, or None where it cannot be built here."""
    if not _cpu_has_avx2_fma():
        log.info("cpu_linear: no AVX2/FMA x86-64 CPU; using torch's linear")
        return None
    try:
        from pice.kernels.build import load_extension

        return load_extension("pice_skinny_linear", sources=[str(_SOURCE)],
                              extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                              extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler / headers: keep torch's path
        log.warning("cpu_linear: could not build the AVX2 kernel (%s); using torch's linear",
                    exc)
        return None


class SkinnyLinear(nn.Linear):
    """nn.Linear whose few-row fp32 CPU calls go to the kernel (same parameters, same math up
    to summation order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = load_kernel()
        if (kernel is None or x.dim() != 2 or x.shape[0] > MAX_ROWS or x.device.type != "cpu"
                or x.dtype != torch.float32):
            return F.linear(x, self.weight, self.bias)
        y = kernel.skinny_linear(x.contiguous(), self.weight)  # y: [rows, out_features]
        return y + self.bias if self.bias is not None else y


def use_cpu_kernels(model: nn.Module) -> int:
    """Switch every fp32 CPU nn.Linear of `model` to SkinnyLinear; returns how many. Does
    nothing (returns 0) where the kernel cannot be built."""
    if load_kernel() is None:
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32 and \
                module.weight.device.type == "cpu":
            module.__class__ = SkinnyLinear
            count += 1
    return count
