"""`pice bench quality`: answer quality of progressive variants against the full-cloud answer, on
the same models and questions, with each variant's latency beside it. Writes JSON and a PNG.

Variants: `cloud` (the baseline), `progressive` (one candidate per point, no guard),
`ensemble` (a candidate from every base edge model per point, best one chosen, quality guard on)
and `ensemble+adapter` (the same plus the distilled expansion adapter as a further candidate).

Per question and variant:
(a) judge: the cloud model compares the variant's answer with the full-cloud answer in both
    orders; its verdict is read from the logits of the answer tokens (P("A") vs P("B")), not
    from free text. A variant WINS when it is preferred in both orders, LOSES when the cloud
    answer is preferred in both, and TIES when the verdict flips with the order (position bias);
(b) coverage: the share of the full-cloud answer's sentences that some sentence of the variant's
    answer matches (MiniLM cosine >= COVER_SIM);
(c) similarity: MiniLM cosine between the whole answer and the full-cloud answer."""

from __future__ import annotations

import asyncio
import json
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from pice.bench.judge import CORRUPTIONS, next_token_logits, rubric, validate
from pice.bench.progressive import load_questions, round_robin
from pice.cloud.ensemble import EnsembleConfig, PinnedEnsemble, Source
from pice.cloud.events import DoneEvent
from pice.cloud.guard import GuardConfig
from pice.cloud.metrics import Metrics
from pice.cloud.pipeline import AnswerRequest, Pipeline
from pice.edge.distill import EXPANDER_ADAPTER
from pice.runtime import build_pipeline, load_generator
from pice.scheduler.service import Scheduler
from pice.shared.backend import TextGenerator
from pice.shared.config import ServeSettings
from pice.shared.embeddings import get_embedder
from pice.shared.models import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL

VARIANTS = ("cloud", "progressive", "ensemble", "ensemble+adapter")
RUBRIC_MARGIN = 0.25  # rubric scores this close are a tie
COVER_SIM = 0.6  # a reference sentence counts as covered at this cosine similarity or above
JUDGE_SYSTEM = ("You are a strict, fair judge of answers. Compare two answers to the same "
                "question for correctness, helpfulness, completeness and clarity. Ignore length "
                "unless it hurts the answer. Reply with a single letter: A or B.")


@dataclass
class QualityConfig:
    cloud_model: str = DEFAULT_CLOUD_MODEL
    edge_models: list[str] = field(
        default_factory=lambda: [DEFAULT_EDGE_MODEL, "gemma-3-270m"])
    limit: int = 7  # questions (round-robin over categories); 0 → all
    suitable_only: bool = True  # only questions labeled as suiting a sketch
    categories: list[str] | None = None
    max_tokens: int = 192
    max_points: int = 6
    out_dir: Path = Path("bench-results")
    cache_dir: Path | None = None
    threads: int = 0
    backend: str = "engine"
    judge: bool = True
    adapter: Path | None = None  # distilled adapter for edge_models[0] (None → the shipped one)
    questions: Path | None = None  # JSONL like bench/questions.jsonl (None → that file)
    # judge validation (bench/judge.py) before any variant is judged: on the full-cloud answers
    # of the first `validate_limit` questions, or on those of an earlier quality.json
    validate_limit: int = 6
    judge_items: Path | None = None
    validate_only: bool = False  # stop after the validation (quality_judge.json)
    eager: bool = True  # progressive variants dispatch each point as its sketch line completes


@dataclass
class Row:
    id: str
    category: str
    suits_sketch: bool
    variant: str
    ran: str  # mode that actually ran
    latency: float
    ttft: float
    ensemble: int
    repaired: int  # points the guard had the cloud rewrite
    winners: dict[str, int]  # winning candidates by "model[+adapter]"
    scores: list[float | None]  # each section's selection score (None: written by the cloud)
    similarity: float = 1.0
    coverage: float = 1.0
    p_variant_first: float = 0.5  # P(variant better) with the variant shown as A
    p_variant_second: float = 0.5  # ... shown as B
    verdict: str = "tie"  # win | tie | loss (vs the full-cloud answer), pairwise judge
    score_variant: float = 0.0  # rubric judge, 1-9 (0: not judged)
    score_cloud: float = 0.0
    rubric_verdict: str = "tie"  # win | tie | loss by rubric score (margin RUBRIC_MARGIN)
    answer: str = field(default="", repr=False)


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [re.sub(r"^\s*(?:\d{1,2}[.)]|[-*•])\s*", "", p).strip() for p in parts
            if len(p.strip()) > 3]


def coverage(reference: str, answer: str) -> float:
    ref, ans = _sentences(reference), _sentences(answer)
    if not ref:
        return 1.0
    if not ans:
        return 0.0
    sims = get_embedder().similarity(ref, ans)  # [ref, ans]
    return float((sims.max(axis=1) >= COVER_SIM).mean())


def similarity(reference: str, answer: str) -> float:
    return float(get_embedder().similarity([reference], [answer or " "])[0, 0])


def judge(gen: TextGenerator, question: str, first: str, second: str) -> float:
    """P(first answer better) from the logits of "A" and "B" (renormalized over the two)."""
    prompt = gen.render_chat([
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": f"Question: {question}\n\n[Answer A]\n{first}\n\n"
                                    f"[Answer B]\n{second}\n\nWhich answer is better, A or B?"},
    ])
    logits = next_token_logits(gen, prompt)
    a = gen.chat.encode("A")[0]  # type: ignore[attr-defined]
    b = gen.chat.encode("B")[0]  # type: ignore[attr-defined]
    return float(torch.softmax(logits[[a, b]], -1)[0])


def verdict(p_first: float, p_second: float) -> str:
    """Win only if preferred in both orders, loss if the cloud answer is, else a tie."""
    if p_first > 0.5 and p_second > 0.5:
        return "win"
    if p_first < 0.5 and p_second < 0.5:
        return "loss"
    return "tie"


def variant_configs(pipeline: Pipeline, cfg: QualityConfig) -> dict[str, EnsembleConfig]:
    base = [Source(model=m) for m in dict.fromkeys(cfg.edge_models)]
    loaded = [s for s in pipeline.expander.cfg.sources if s.adapter == EXPANDER_ADAPTER]
    if cfg.adapter is not None and not loaded:
        pipeline.edge_generators[cfg.edge_models[0]].add_adapter(EXPANDER_ADAPTER, cfg.adapter)
        loaded = [Source(model=cfg.edge_models[0], adapter=EXPANDER_ADAPTER)]
    guard = GuardConfig()
    return {
        "progressive": EnsembleConfig(sources=base[:1], k=1, guard=GuardConfig(enabled=False)),
        "ensemble": EnsembleConfig(sources=base, k=len(base), guard=guard),
        "ensemble+adapter": EnsembleConfig(sources=[*loaded, *base], k=len(loaded) + len(base),
                                           guard=guard),
    }


async def _answer(pipeline: Pipeline, q: dict[str, Any], variant: str,
                  cfg: QualityConfig) -> DoneEvent:
    req = AnswerRequest(request_id=f"quality-{q['id']}-{variant}",
                        messages=[{"role": "user", "content": q["question"]}],
                        max_tokens=cfg.max_tokens,
                        mode="cloud" if variant == "cloud" else "progressive",
                        max_points=cfg.max_points, endpoint="bench")
    done: DoneEvent | None = None
    async for ev in pipeline.run(req):
        if isinstance(ev, DoneEvent):
            done = ev
    assert done is not None
    return done


def _row(q: dict[str, Any], variant: str, done: DoneEvent) -> Row:
    winners: dict[str, int] = {}
    for s in done.sections:
        key = s.worker if s.repaired else s.model + (f"+{s.adapter}" if s.adapter else "")
        winners[key] = winners.get(key, 0) + 1
    return Row(q["id"], q["category"], q["suits_sketch"], variant, done.mode,
               done.timings["total"], done.timings["ttft"], done.ensemble, len(done.repaired),
               winners, [s.score for s in done.sections], answer=done.text)


def _summary(rows: list[Row]) -> dict[str, Any]:
    def agg(sel: list[Row]) -> dict[str, Any]:
        if not sel:
            return {}
        verdicts = [r.verdict for r in sel]
        return {
            "questions": len(sel),
            "win": verdicts.count("win") / len(sel),
            "tie": verdicts.count("tie") / len(sel),
            "loss": verdicts.count("loss") / len(sel),
            "win_or_tie": (verdicts.count("win") + verdicts.count("tie")) / len(sel),
            "p_better_mean": statistics.fmean((r.p_variant_first + r.p_variant_second) / 2
                                              for r in sel),
            "similarity_mean": statistics.fmean(r.similarity for r in sel),
            "coverage_mean": statistics.fmean(r.coverage for r in sel),
            "latency_mean_s": statistics.fmean(r.latency for r in sel),
            "ttft_mean_s": statistics.fmean(r.ttft for r in sel),
            "repaired_points": sum(r.repaired for r in sel),
            "rubric_win": [r.rubric_verdict for r in sel].count("win") / len(sel),
            "rubric_win_or_tie": sum(r.rubric_verdict != "loss" for r in sel) / len(sel),
            "rubric_score_mean": statistics.fmean(r.score_variant for r in sel),
        }

    out: dict[str, Any] = {"overall": {v: agg([r for r in rows if r.variant == v])
                                       for v in VARIANTS}}
    for cat in dict.fromkeys(r.category for r in rows):
        out[cat] = {v: agg([r for r in rows if r.variant == v and r.category == cat])
                    for v in VARIANTS}
    return out


def _target(rows: list[Row]) -> dict[str, Any]:
    """Progressive with ensemble and adapter: wins or ties on >= 50% of the suitable questions
    while cutting mean latency by >= 40% on them."""
    mine = [r for r in rows if r.variant == "ensemble+adapter" and r.suits_sketch]
    base = {r.id: r for r in rows if r.variant == "cloud"}
    if not mine:
        return {}
    ok = sum(r.rubric_verdict in ("win", "tie") for r in mine) / len(mine)
    cut = 1 - statistics.fmean(r.latency for r in mine) / statistics.fmean(
        base[r.id].latency for r in mine)
    return {"questions": len(mine), "win_or_tie": ok, "latency_cut": cut,
            "met": ok >= 0.5 and cut >= 0.4}


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [c for c in summary if c != "overall"] + ["overall"]
    shown = VARIANTS[1:]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    width = 0.8 / len(shown)
    for i, v in enumerate(shown):
        xs = [j + (i - (len(shown) - 1) / 2) * width for j in range(len(cats))]
        win = [summary[c][v].get("win", 0) for c in cats]
        tie = [summary[c][v].get("tie", 0) for c in cats]
        axes[0].bar(xs, win, width, label=f"{v}: win", color=f"C{i}")
        axes[0].bar(xs, tie, width, bottom=win, color=f"C{i}", alpha=0.4,
                    label=f"{v}: tie")
        axes[1].bar(xs, [summary[c][v].get("similarity_mean", 0) for c in cats], width,
                    label=v, color=f"C{i}")
    for ax, title in ((axes[0], "vs full cloud: win (solid) + tie (light), judged both orders"),
                      (axes[1], "embedding similarity to the full-cloud answer")):
        ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    overall = summary["overall"]
    axes[2].bar(list(VARIANTS), [overall[v].get("latency_mean_s", 0) for v in VARIANTS],
                color=["grey", "C0", "C1", "C2"])
    axes[2].set_ylabel("mean latency (s)")
    axes[2].set_title("latency per variant (all questions)", fontsize=9)
    axes[2].tick_params(axis="x", labelsize=8)
    fig.suptitle("pice bench quality")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_quality(cfg: QualityConfig, progress: bool = True) -> dict[str, Any]:
    rows_q = (load_questions(cfg.categories, 0) if cfg.questions is None else
              [json.loads(line) for line in cfg.questions.read_text().splitlines() if line])
    if cfg.suitable_only:
        rows_q = [q for q in rows_q if q["suits_sketch"]]
    questions = round_robin(rows_q, cfg.limit)
    settings = ServeSettings(cloud_model=cfg.cloud_model, edge_models=cfg.edge_models,
                             cache_dir=cfg.cache_dir, threads=cfg.threads,
                             default_max_tokens=cfg.max_tokens, backend=cfg.backend,
                             default_max_points=cfg.max_points)
    if cfg.validate_only and cfg.judge_items is not None:  # the cloud model alone
        report = _validate_judge(load_generator(cfg.cloud_model, settings, progress), cfg,
                                 progress)
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        (cfg.out_dir / "quality_judge.json").write_text(json.dumps(report, indent=2))
        return {"judge_validation": report}
    pipeline = build_pipeline(settings, Metrics(), progress)
    pipeline.eager = cfg.eager
    cloud_done: dict[str, DoneEvent] = {}
    validation: dict[str, Any] = {}
    if cfg.judge:
        if cfg.judge_items is None:  # this run's first full-cloud answers (kept for later)
            for q in questions[:cfg.validate_limit]:
                cloud_done[q["id"]] = asyncio.run(_answer(pipeline, q, "cloud", cfg))
        validation = _validate_judge(pipeline.cloud, cfg, progress, [
            (q["question"], cloud_done[q["id"]].text) for q in questions[:cfg.validate_limit]
            if q["id"] in cloud_done])
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        (cfg.out_dir / "quality_judge.json").write_text(json.dumps(validation, indent=2))
        if cfg.validate_only:
            return {"judge_validation": validation}
    configs = variant_configs(pipeline, cfg)
    scheduler = pipeline.scheduler
    rows: list[Row] = []
    t0 = time.perf_counter()
    result = _result(cfg, configs, rows, 0.0, validation)
    for i, q in enumerate(tqdm(questions, desc="bench quality", unit="question",
                               disable=not progress)):
        order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
        done: dict[str, DoneEvent] = {}
        for v in order:
            if v == "cloud" and q["id"] in cloud_done:
                done[v] = cloud_done[q["id"]]
                continue
            if v in configs:
                pipeline.expander.cfg = configs[v]
                pipeline.scheduler = cast(Scheduler, PinnedEnsemble(scheduler, configs[v].k))
            done[v] = asyncio.run(_answer(pipeline, q, v, cfg))
        ref = done["cloud"].text
        ref_score = rubric(pipeline.cloud, q["question"], ref) if cfg.judge else 0.0
        for v in VARIANTS:
            row = _row(q, v, done[v])
            if v != "cloud":
                row.similarity = similarity(ref, row.answer)
                row.coverage = coverage(ref, row.answer)
                if cfg.judge:  # the engine is idle now: the judge borrows its weights
                    row.p_variant_first = judge(pipeline.cloud, q["question"], row.answer, ref)
                    row.p_variant_second = 1 - judge(pipeline.cloud, q["question"], ref,
                                                     row.answer)
                    row.verdict = verdict(row.p_variant_first, row.p_variant_second)
                    row.score_cloud = ref_score
                    row.score_variant = rubric(pipeline.cloud, q["question"], row.answer)
                    gap = row.score_variant - ref_score
                    row.rubric_verdict = ("win" if gap > RUBRIC_MARGIN else
                                          "loss" if gap < -RUBRIC_MARGIN else "tie")
            rows.append(row)
        result = _result(cfg, configs, rows, time.perf_counter() - t0,
                         validation)  # kept after each question
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        (cfg.out_dir / "quality.json").write_text(json.dumps(result, indent=2, default=str))
    _plot(result["summary"], cfg.out_dir / "quality.png")
    return result


def _validate_judge(gen: TextGenerator, cfg: QualityConfig, progress: bool,
                    items: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Judge validation on full-cloud answers: `items`, else an earlier run's
    (`judge_items`)."""
    if items is None or cfg.judge_items is not None:
        assert cfg.judge_items is not None
        earlier = json.loads(cfg.judge_items.read_text())
        asked = {q["id"]: q["question"] for q in load_questions(None, 0)}
        items = [(asked[r["id"]], r["answer"]) for r in earlier["rows"]
                 if r["variant"] == "cloud" and r["id"] in asked][:cfg.validate_limit]
    t0 = time.perf_counter()
    with tqdm(total=len(items) * len(CORRUPTIONS), desc="judge validation", unit="pair",
              disable=not progress) as bar:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        partial = cfg.out_dir / "quality_judge.json"
        report = validate(gen, items, progress=bar, on_row=lambda r: partial.write_text(
            json.dumps({**r, "items": len(items), "partial": True}, indent=2)))
    report["items"] = len(items)
    report["judge_model"] = cfg.cloud_model
    report["seconds"] = time.perf_counter() - t0
    return report


def _result(cfg: QualityConfig, configs: dict[str, EnsembleConfig], rows: list[Row],
            wall_s: float, validation: dict[str, Any] | None = None) -> dict[str, Any]:
    summary = _summary(rows)
    return {
        "judge_validation": {k: v for k, v in (validation or {}).items() if k != "rows"},
        "bench": "quality",
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "definitions": {"win": "preferred by the judge in both orders",
                        "loss": "the full-cloud answer preferred in both orders",
                        "tie": "the preference flips with the order",
                        "coverage": f"share of full-cloud sentences matched at cosine >= "
                                    f"{COVER_SIM}",
                        "similarity": "MiniLM cosine to the full-cloud answer"},
        "wall_s": wall_s,
        "variants": {v: c.model_dump() for v, c in configs.items()},
        "target": _target(rows),
        "summary": summary,
        "rows": [asdict(r) for r in rows],
    }
