"""`pice bench lora --tiny`: the whole benchmark (trace, three systems in their own processes,
microbenchmarks, JSON + PNG) on a tiny random model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from pice.bench.lora import LoraBenchConfig, make_trace, run_lora_bench


def test_trace_follows_the_s_lora_recipe() -> None:
    cfg = LoraBenchConfig(requests=400, ns=[1, 10], alphas=[0.1, 1.0], baseline_n=10)
    skewed = make_trace(10, 0.1, cfg, vocab=500)
    uniform = make_trace(10, 1.0, cfg, vocab=500)
    assert sum(r["adapter"] == 0 for r in skewed) > 0.6 * 400  # u^10 * n: mostly adapter 0
    assert len({r["adapter"] for r in uniform}) == 10
    assert all(8 <= len(r["prompt"]) <= 128 and 8 <= r["out_len"] <= 256 for r in uniform)
    gaps = [b["arrival"] - a["arrival"] for a, b in itertools.pairwise(uniform)]
    mean = sum(gaps) / len(gaps)
    assert 0.4 < mean < 0.6  # rate 2 req/s
    assert all(g > 0 for g in gaps)


def test_tiny_bench_runs_every_system(tmp_path: Path) -> None:
    result = run_lora_bench(LoraBenchConfig(tiny=True, out_dir=tmp_path))
    saved = json.loads((tmp_path / "lora.json").read_text())
    assert (tmp_path / "lora.png").stat().st_size > 0
    assert set(saved["systems"]) == {"pice", "peft_switch", "peft_batch"}
    key = result["baseline_trace"]
    served = {kind: s["traces"][key]["tokens"] for kind, s in result["systems"].items()}
    assert len(set(served.values())) == 1  # the same trace, every token served by each
    for trace in result["systems"]["pice"]["traces"].values():
        pool = trace["pool"]
        assert pool["hits"] + pool["misses"] == trace["requests"] == 5
        assert 0 <= trace["slo_attainment"] <= 1
    micro = result["micro"]
    assert micro["decode_step_base_ms"] > 0 and micro["decode_step_8_adapters_ms"] > 0
    assert set(result["ratios"]) >= {"decode_step_8_adapters_vs_base",
                                     "throughput_vs_peft_switch", "idle_ttft_p90_miss_vs_hit"}
