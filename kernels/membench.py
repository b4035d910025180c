"""Memory read bandwidth as a decode step sees it (csrc/membench.cpp): every thread of torch's
pool streams its share of one large buffer. The limit `pice bench engine` measures decode
against; built on first use (a benchmark needs it, serving does not)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("csrc") / "membench.cpp"


def read_bandwidth_gb_s(gib: float = 1.0, reps: int = 12, threads: int = 0) -> float:
    """GB/s reading a `gib` GiB buffer with `threads` threads (0: torch's), best of `reps`.
    Falls back to torch's sum (also split across threads) where the kernel cannot be built."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = torch.ones(int(gib * 2**30) // 4)
        try:
            from pice.kernels.build import load_extension

            ext = load_extension("pice_membench", sources=[str(_SOURCE)],
                                 extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])

            def read() -> float:
                return float(ext.read_seconds(x))
        except Exception:  # no compiler
            def read() -> float:
                t0 = time.perf_counter()
                x.sum()
                return time.perf_counter() - t0
        read()  # fault the pages in
        best = min(read() for _ in range(reps))
        return x.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(before)
