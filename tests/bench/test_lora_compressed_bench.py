"""`pice bench lora --compressed --tiny`: compressed vs uncompressed at equal adapter memory on a
tiny random model, every system in its own process, JSON + PNG and the table."""

from __future__ import annotations

import json
from pathlib import Path

from pice.bench.lora_compressed import CompressedBenchConfig, run_compressed_bench
from pice.bench.lora_compressed_report import table


def test_tiny_compressed_bench(tmp_path: Path) -> None:
    cfg = CompressedBenchConfig(tiny=True, ns=[12], requests=6, sat_requests=10, subspaces=2,
                                ranks=[16], clusters=[2], out_dir=tmp_path)
    result = run_compressed_bench(cfg)
    saved = json.loads((tmp_path / "lora_compressed.json").read_text())
    assert (tmp_path / "lora_compressed.png").stat().st_size > 0
    assert saved["compression"]["12"]["compressed"] == 12
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"compressed", "uncompressed"}
    assert rows["compressed"]["slots"] == 2  # one slot per cluster basis
    for r in rows.values():  # the same traces, every token served
        assert r["requests"] == 6 and r["tokens"] == rows["compressed"]["tokens"]
        assert r["sat_requests"] == 10  # throughput from the saturation replay
        pool = r["pool"]
        assert pool["hits"] + pool["misses"] == 6  # the latency replay's
        assert r["sat_reps"] == 1 and r["throughput_vs_single"] > 0
    raw = json.loads((tmp_path / "lora_compressed-raw.json").read_text())
    assert set(raw) == {"single/n=12", "compressed/n=12", "uncompressed/n=12"}
    # the decode-step microbenchmark: the single adapter vs 12 distinct compressed ones
    assert rows["compressed"]["step_ms_single"] > 0 and rows["compressed"]["step_vs_single"] > 0
    assert rows["compressed"]["single_tok_s"] > 0
    assert "| 12 | compressed | 2 |" in table(result)
