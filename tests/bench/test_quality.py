"""`pice bench quality` at CI size on tiny models: answers come from a real server on loopback
(cloud, eager progressive, non-eager progressive; the ensemble on two edge models plus a LoRA
adapter), are cached as JSON and reused, every variant is judged in both orders, and JSON and
PNG are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pice.bench.quality import QualityConfig, _settings, run_quality
from tests.conftest import SKETCH_QUESTIONS
from tests.factories import peft_adapter, tiny_qwen2


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
                        adapter=adapter, questions=questions, concurrency=2,
                        judge_no_eager=True, latency_limit=1)
    result = run_quality(cfg, progress=False)
    assert (tmp_path / "out" / "quality.png").stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert saved["target"] == result["target"] and saved["target"]["questions"] == 2
    assert "judge" in json.loads((tmp_path / "out" / "quality_judge.json").read_text())
    cached = sorted((tmp_path / "cache" / "bench-quality").glob("*.json"))
    phases = {p.name.rsplit("-", 1)[0] for p in cached}
    assert {"cloud", "progressive", "progressive-no-eager"} <= phases
    assert {"latency-cloud", "latency-progressive"} <= phases
    for p in cached:
        if p.name.startswith("latency"):  # one question at a time, on the first only
            assert {"t0"} <= set(json.loads(p.read_text())) and "t1" not in p.read_text()
        elif not p.name.startswith("profiles"):
            assert {"t0", "t1"} <= set(json.loads(p.read_text()))
    rows = result["rows"]
    assert {(r["id"], r["variant"]) for r in rows} == {
        (q, v) for q in ("t0", "t1") for v in ("progressive", "progressive-no-eager")}
    for r in rows:
        assert r["ran"] == "progressive" and r["ensemble"] in (1, 2, 3)
        assert r["verdict"] in ("win", "tie", "loss")
        # the judge has no position: the verdict with the variant shown second is the same
        assert r["verdict_variant_first"] == r["verdict_variant_second"]
        assert r["latency"] > 0 and r["first_text"] > 0 and r["cloud_latency"] > 0
    overall = result["summary"]["overall"]["progressive"]
    assert overall["win"] + overall["tie"] + overall["loss"] == pytest.approx(1.0)
    assert overall["first_shown_wins"] == 0.5
    timing = result["summary"]["timing"]
    assert timing["eager_vs_not"]["first_section_ratio"] > 0
    assert set(timing) >= {"cloud", "progressive", "progressive-no-eager"}
    assert timing["latency-progressive"]["questions"] == timing["latency-cloud"]["questions"] == 1
    one = timing["progressive_vs_cloud_concurrency_1"]
    assert result["target"]["latency_cut_concurrency_1"] == one["latency_cut"] < 1
    # a rerun reuses every cached answer and judge profile: the same verdicts
    again = run_quality(cfg, progress=False)
    assert [(r["id"], r["variant"], r["preference"]) for r in again["rows"]] == [
        (r["id"], r["variant"], r["preference"]) for r in rows]


def test_one_at_a_time_alternates_the_phases(sketch_model_dir: Path, tiny_model_dir: Path,
                                             tmp_path: Path) -> None:
    """At concurrency 1 the phases alternate question by question (a slow spell of the machine
    then weighs on both sides): cloud first on even questions, last on odd ones."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": f"t{i}", "category": "generic",
                                             "question": q, "suits_sketch": True}) + "\n"
                                 for i, q in enumerate(SKETCH_QUESTIONS[:3])))
    cfg = QualityConfig(cloud_model=str(sketch_model_dir), edge_models=[str(tiny_model_dir)],
                        limit=3, max_tokens=48, max_points=3, out_dir=tmp_path / "out",
                        cache_dir=tmp_path / "cache", questions=questions, concurrency=1,
                        latency_limit=0, eager_compare=False, judge=False)
    result = run_quality(cfg, progress=False)
    cached = {p.name.rsplit("-", 1)[0]: json.loads(p.read_text())
              for p in (tmp_path / "cache" / "bench-quality").glob("*.json")}
    assert set(cached) == {"cloud", "progressive"}
    ids = [f"t{i}" for i in range(len(SKETCH_QUESTIONS[:3]))]
    assert len(ids) >= 2
    for phase in cached.values():
        assert set(ids) <= set(phase)
    for j, i in enumerate(ids):
        cloud_first = cached["cloud"][i]["finished_at"] < cached["progressive"][i]["finished_at"]
        assert cloud_first == (j % 2 == 0), i
    assert result["timing"]["cloud"]["questions"] == len(ids)


def test_a_given_adapter_replaces_the_shipped_one(tmp_path: Path) -> None:
    """`--adapter` registers its adapter under the shipped one's name, so the server must not
    load the shipped one first (it did: "adapter 'pice-expander' already exists")."""
    assert _settings(QualityConfig(out_dir=tmp_path)).expander_adapter
    assert not _settings(QualityConfig(out_dir=tmp_path, adapter=tmp_path)).expander_adapter
