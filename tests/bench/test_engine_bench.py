"""`pice bench engine` accounting: bytes a decode step reads for every weight format (int8 was
once counted as zero), the bandwidth limit read with torch's threads, and each system's share of
it computed from its own bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pice.bench.engine import _ratios, memory_read_bandwidth
from pice.shared.engine.models import build_model
from pice.shared.engine.models.quantized import step_bytes


def test_int8_and_int4_weights_count_at_their_packed_size(tiny_model_dir: Path) -> None:
    fp32 = build_model(tiny_model_dir)
    matrices = sum(m.weight.numel() for m in fp32.modules() if isinstance(m, nn.Linear))
    assert step_bytes(fp32) >= 4 * matrices  # the tied head (= embedding) counted once
    q8 = step_bytes(build_model(tiny_model_dir, quantization="int8"))
    q4 = step_bytes(build_model(tiny_model_dir, quantization="int4"))
    assert matrices * 34 / 32 <= q8 < step_bytes(fp32) / 3  # Q8_0: 34 bytes per 32 weights
    assert matrices * 18 / 32 <= q4 < q8  # Q4_0 (rows of 64 are not a multiple of 256)


@pytest.mark.parametrize("threads", [1, 2])
def test_bandwidth_is_read_with_the_given_threads(threads: int) -> None:
    before = torch.get_num_threads()
    gb_s = memory_read_bandwidth(gib=0.03, reps=2, threads=threads)
    assert 0.1 < gb_s < 10_000
    assert torch.get_num_threads() == before


def test_each_system_is_measured_against_its_own_bytes() -> None:
    def rows(tok_s: float) -> list[dict[str, float]]:
        return [{"batch": 1, "decode_tok_s": tok_s, "ttft_s": 0.1}]

    results = {
        "hf": {"rows": rows(5.0), "peak_rss_mb": 1000.0},
        "engine": {"rows": rows(6.0), "weight_bytes": 2_000_000_000, "peak_rss_mb": 900.0},
        "engine_int8": {"rows": rows(12.0), "weight_bytes": 530_000_000},
        "prefix_shared": {"prefill_s": 1.0}, "prefix_unshared": {"prefill_s": 2.0},
        "int8_accuracy": {"top1_agreement": 0.9, "mean_kl": 0.01},
    }
    r = _ratios(results, bw_gb_s=20.0)
    assert r["bandwidth_limit_fp32_tok_s"] == pytest.approx(10.0)
    assert r["engine_b1_fraction_of_bandwidth_limit"] == pytest.approx(0.6)
    assert r["int8_b1_fraction_of_bandwidth_limit"] == pytest.approx(12.0 * 0.53 / 20.0)
