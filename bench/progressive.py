"""`pice bench progressive`: progressive (cloud sketch + batched edge expansion) vs full cloud,
side by side in one run, on the same models and questions. Writes JSON and a PNG plot.

Each question runs in both modes, alternating which goes first to spread drift. The `auto` row
is derived, not re-run: greedy decoding is deterministic, so the scheduler's choice per question
picks that question's measured row."""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pice.cloud.events import DoneEvent
from pice.cloud.metrics import Metrics
from pice.cloud.pipeline import AnswerRequest, Pipeline
from pice.runtime import build_pipeline
from pice.scheduler.policy import QueryFeatures
from pice.shared.config import ServeSettings

MODES = ("cloud", "progressive")


@dataclass
class BenchConfig:
    cloud_model: str
    edge_model: str
    limit: int = 0  # 0 → every question
    max_tokens: int = 256
    out_dir: Path = Path("bench-results")
    cache_dir: Path | None = None
    threads: int = 0
    categories: list[str] | None = None
    max_points: int = 6
    backend: str = "engine"  # generation backend for both tiers
    quantization: str | None = None
    edges: str = "local"  # "remote": in-process worker vs `pice edge` agents (progressive_remote)


@dataclass
class Row:
    id: str
    category: str
    suits_sketch: bool
    mode: str  # requested
    ran: str  # what actually ran (a failed sketch falls back to cloud)
    latency: float  # seconds, request start → done
    ttft: float  # seconds to first answer text (a sketch point, or a full-cloud token)
    sketch_s: float  # seconds until the sketch was ready (0 for full cloud)
    cloud_tokens: int
    edge_tokens: int
    auto_choice: str  # what the scheduler picks for this question in `auto` mode
    answer: str = field(repr=False)


def load_questions(categories: list[str] | None, limit: int) -> list[dict[str, Any]]:
    text = resources.files("pice.bench").joinpath("questions.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if categories:
        rows = [r for r in rows if r["category"] in categories]
    return round_robin(rows, limit)


def round_robin(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Up to `limit` rows (0 → all), taken across categories in turn so that a small run still
    covers all of them."""
    if not limit:
        return rows
    by_cat: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    picked: list[dict[str, Any]] = []
    while len(picked) < min(limit, len(rows)):
        for cat_rows in by_cat.values():
            if cat_rows and len(picked) < limit:
                picked.append(cat_rows.pop(0))
    return picked


async def _one(pipeline: Pipeline, q: dict[str, Any], mode: str, cfg: BenchConfig) -> Row:
    req = AnswerRequest(request_id=f"bench-{q['id']}-{mode}",
                        messages=[{"role": "user", "content": q["question"]}],
                        max_tokens=cfg.max_tokens, mode=mode, max_points=cfg.max_points,
                        endpoint="bench")
    done: DoneEvent | None = None
    async for ev in pipeline.run(req):
        if isinstance(ev, DoneEvent):
            done = ev
    assert done is not None
    auto = pipeline.scheduler.decide(QueryFeatures(q["question"], "auto", cfg.max_tokens,
                                                   cfg.max_points), pipeline.edges.snapshot())
    return Row(q["id"], q["category"], q["suits_sketch"], mode, done.mode,
               done.timings["total"], done.timings["ttft"], done.timings.get("sketch", 0.0),
               done.tokens["cloud"],
               done.tokens["edge"], auto.mode, done.text)


def _summary(rows: list[Row], wall: dict[str, float]) -> dict[str, Any]:
    def agg(sel: list[Row], seconds: float) -> dict[str, float]:
        tokens = sum(r.cloud_tokens + r.edge_tokens for r in sel)
        return {
            "requests": len(sel),
            "latency_mean_s": statistics.fmean(r.latency for r in sel),
            "latency_p50_s": statistics.median(r.latency for r in sel),
            "ttft_mean_s": statistics.fmean(r.ttft for r in sel),
            "sketch_mean_s": statistics.fmean(r.sketch_s for r in sel),
            "cloud_tokens_per_answer": statistics.fmean(r.cloud_tokens for r in sel),
            "edge_tokens_per_answer": statistics.fmean(r.edge_tokens for r in sel),
            "throughput_tok_s": tokens / seconds,
            "answers_per_min": 60 * len(sel) / seconds,
        }

    out = {m: agg([r for r in rows if r.mode == m], wall[m]) for m in MODES}
    auto = [r for r in rows if r.mode == r.auto_choice]
    out["auto"] = agg(auto, sum(r.latency for r in auto))
    return out


def _ratios(s: dict[str, Any]) -> dict[str, float]:
    c, p, a = s["cloud"], s["progressive"], s["auto"]
    return {
        "progressive_latency_speedup": c["latency_mean_s"] / p["latency_mean_s"],
        "progressive_ttft_speedup": c["ttft_mean_s"] / p["ttft_mean_s"],
        "progressive_throughput_ratio": p["throughput_tok_s"] / c["throughput_tok_s"],
        "progressive_cloud_token_ratio": p["cloud_tokens_per_answer"]
        / c["cloud_tokens_per_answer"],
        "auto_latency_speedup": c["latency_mean_s"] / a["latency_mean_s"],
    }


def _plot(rows: list[Row], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = [r.id for r in rows if r.mode == "cloud"]
    lat = {m: [r.latency for r in rows if r.mode == m] for m in MODES}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1]})
    x = range(len(ids))
    ax1.bar([i - 0.2 for i in x], lat["cloud"], 0.4, label="full cloud (baseline)")
    ax1.bar([i + 0.2 for i in x], lat["progressive"], 0.4, label="progressive")
    ax1.set_xticks(list(x), ids, rotation=70, fontsize=7)
    ax1.set_ylabel("latency per request (s)")
    ax1.legend()
    names = ["cloud", "progressive", "auto"]
    ax2.bar(names, [summary[n]["latency_mean_s"] for n in names], label="latency")
    ax2.bar(names, [summary[n]["ttft_mean_s"] for n in names], label="time to first text")
    ax2.set_ylabel("mean seconds")
    ax2.legend()
    fig.suptitle("pice bench progressive")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    if cfg.edges == "remote":
        from pice.bench.progressive_remote import run_remote_bench

        return run_remote_bench(cfg)
    questions = load_questions(cfg.categories, cfg.limit)
    settings = ServeSettings(cloud_model=cfg.cloud_model, edge_models=[cfg.edge_model],
                             cache_dir=cfg.cache_dir, threads=cfg.threads,
                             default_max_tokens=cfg.max_tokens, backend=cfg.backend,
                             quantization=cfg.quantization)
    pipeline = build_pipeline(settings, Metrics())
    rows: list[Row] = []
    wall = dict.fromkeys(MODES, 0.0)
    for i, q in enumerate(tqdm(questions, desc="bench progressive", unit="question")):
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
            t0 = time.perf_counter()
            row = asyncio.run(_one(pipeline, q, mode, cfg))
            wall[mode] += time.perf_counter() - t0
            rows.append(row)
    summary = _summary(rows, wall)
    result = {
        "bench": "progressive",
        "config": {**asdict(cfg), "out_dir": str(cfg.out_dir),
                   "cache_dir": str(cfg.cache_dir) if cfg.cache_dir else None},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "summary": summary,
        "ratios": _ratios(summary),
        "rows": [asdict(r) for r in rows],
    }
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / "progressive.json").write_text(json.dumps(result, indent=2))
    _plot(rows, summary, cfg.out_dir / "progressive.png")
    return result
