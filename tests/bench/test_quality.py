"""`pice bench quality` at CI size on tiny models: every variant runs (the ensemble on two edge
models plus a LoRA adapter), the judge reads the engine's own logits, JSON and PNG are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pice.bench.quality import QualityConfig, coverage, next_token_logits, run_quality, verdict
from pice.shared.engine.generator import EngineGenerator
from pice.shared.hf_backend import HFGenerator
from tests.conftest import SKETCH_QUESTIONS
from tests.factories import peft_adapter, tiny_qwen2


def test_the_judge_reads_the_same_logits_as_transformers(tiny_model_dir: Path) -> None:
    prompt = "Question: How can I sleep better? Which answer is better, A or B?"
    engine = EngineGenerator(str(tiny_model_dir), max_context=1024)
    hf = HFGenerator(str(tiny_model_dir), max_context=1024)
    ours, ref = next_token_logits(engine, prompt), next_token_logits(hf, prompt)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-3)


def test_verdict_needs_both_orders() -> None:
    assert verdict(0.7, 0.6) == "win" and verdict(0.3, 0.2) == "loss"
    assert verdict(0.7, 0.4) == "tie"  # the preference follows the position: no verdict
    assert coverage("Sleep at fixed times. Keep it dark.", "") == 0.0
    assert coverage("Sleep at fixed times.", "Sleep at fixed times.") == 1.0


def test_quality_bench_on_tiny_models(sketch_model_dir: Path, tiny_model_dir: Path,
                                      tmp_path: Path) -> None:
    second = tiny_qwen2(tmp_path / "edge-b", seed=1)
    adapter = peft_adapter(tiny_model_dir, tmp_path / "adapter")
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": f"t{i}", "category": "generic",
                                             "question": q, "suits_sketch": True}) + "\n"
                                 for i, q in enumerate(SKETCH_QUESTIONS)))
    cfg = QualityConfig(cloud_model=str(sketch_model_dir),
                        edge_models=[str(tiny_model_dir), str(second)], limit=2, max_tokens=48,
                        max_points=3, out_dir=tmp_path / "out", cache_dir=tmp_path / "cache",
                        adapter=adapter, questions=questions)
    result = run_quality(cfg, progress=False)
    assert (tmp_path / "out" / "quality.png").stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert saved["target"] == result["target"] and saved["target"]["questions"] == 2
    rows = result["rows"]
    assert len(rows) == 2 * 4
    by = {(r["id"], r["variant"]): r for r in rows}
    for q in ("t0", "t1"):
        assert by[(q, "cloud")]["ran"] == "cloud"
        assert by[(q, "progressive")]["ensemble"] == 1
        assert by[(q, "ensemble")]["ensemble"] == 2
        assert by[(q, "ensemble+adapter")]["ensemble"] == 3
        for v in ("progressive", "ensemble", "ensemble+adapter"):
            r = by[(q, v)]
            assert r["ran"] == "progressive"
            assert r["verdict"] in ("win", "tie", "loss")
            assert 0 < r["p_variant_first"] < 1 and 0 < r["p_variant_second"] < 1
            assert -1 <= r["similarity"] <= 1 + 1e-5 and 0 <= r["coverage"] <= 1
    variants = result["variants"]
    assert variants["ensemble+adapter"]["sources"][0]["adapter"] == "pice-expander"
    overall = result["summary"]["overall"]
    assert overall["ensemble+adapter"]["win"] + overall["ensemble+adapter"]["tie"] + \
        overall["ensemble+adapter"]["loss"] == pytest.approx(1.0)
    assert set(result["summary"]) == {"overall", "generic"}
