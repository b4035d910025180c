"""fp32 linear layers on x86 CPUs through a small AVX2/FMA kernel (csrc/skinny_linear.cpp),
compiled on first use with torch's cpp_extension and cached. Its point is not speed (at batch 1
it is within 10% of torch's GEMM on our 2-core machines, bench/results/) but that every row
count takes the same path with the same summation order per output element, so a request's
result does not depend on the other rows in its batch (torch's BLAS picks its blocking by the
number of rows). Where it cannot be built (no compiler, no AVX2/FMA, not x86-64) every layer
keeps torch's path, which is not batch-invariant; the fallback is logged once, not silent."""

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
    """nn.Linear whose fp32 CPU calls go to the kernel (same parameters, same math up to
    summation order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = load_kernel()
        if kernel is None or x.device.type != "cpu" or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features).contiguous()  # [rows, in_features]
        y = kernel.skinny_linear(flat, self.weight)  # [rows, out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


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
