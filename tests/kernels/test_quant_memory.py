"""Lazily committed zero buffers (the KV pool, LoRA slot buffers): allocating costs no resident
memory, writing a part costs about that part, and the values are zeros like torch.zeros."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pice.kernels.quant_memory import zeros_lazy


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zeros_lazy_commits_memory_only_where_written(dtype: torch.dtype) -> None:
    before = rss_mb()
    t = zeros_lazy((256, 1024, 1024), dtype)  # 512 MB (fp32) / 256 MB
    assert t.dtype == dtype and t.shape == (256, 1024, 1024)
    assert rss_mb() - before < 32
    t[:8].fill_(1.0)  # 1/32 of it
    grown = rss_mb() - before
    assert grown < 0.1 * t.numel() * t.element_size() / 2**20
    assert bool(t[:8].eq(1).all()) and bool(t[8:16].eq(0).all())
    del t
