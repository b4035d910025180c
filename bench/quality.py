"""`pice bench quality`: progressive answers (the default server: sketch by the cloud model,
ensemble of edge candidates with the distilled adapter, quality guard) against full-cloud answers
of the same questions, judged by a judge that first passed its validation.

1. Answers: one real server in this process (bench/quality_serve.py), `concurrency` requests in
   flight (at concurrency 1 the phases alternate question by question), three phases — `cloud`
   (full answer), `progressive` (eager dispatch: a point expands as soon as its sketch line is
   complete) and `progressive-no-eager` (points dispatched once the sketch is complete) — every
   answer cached as JSON in <cache>/bench-quality/.
2. Judge validation (bench/judge.py) on the first `validate_limit` complete, listed full-cloud
   answers: each against its truncated, shuffled, point-removed, echoed and duplicated copy, in
   both orders; quality_judge.json.
3. Each progressive variant against the full-cloud answer, in both orders: WIN when the judge
   prefers it in both, LOSS when it prefers the cloud answer in both, else TIE; the share of
   verdicts that went to the answer shown first (position bias) beside it.
4. Latency: end to end (client side) and time to first section (progressive) / first token
   (cloud), eager vs not, at `concurrency`; and one question at a time (`latency_limit`
   questions, phases latency-cloud and latency-progressive), where the bench's shared cores
   do not also queue other answers; JSON + PNG."""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pice.bench.judge import (
    Profile,
    compare,
    defects,
    items,
    profile,
    self_preference,
    validate,
)
from pice.bench.judge_lm import dense_weights
from pice.bench.progressive import load_questions, round_robin
from pice.bench.quality_plot import plot
from pice.bench.quality_serve import Server, cache_path, generate, load_cache
from pice.cloud.ensemble import Source
from pice.cloud.metrics import Metrics
from pice.edge.distill import EXPANDER_ADAPTER
from pice.runtime import build_pipeline, load_generator
from pice.shared.backend import TextGenerator
from pice.shared.config import ServeSettings
from pice.shared.models.cache import default_cache_dir
from pice.shared.sampling import SamplingParams

# phase → (mode, eager); None: the server's default (eager unless the edges share its cores)
PHASES: dict[str, tuple[str, bool | None]] = {
    "cloud": ("cloud", None), "progressive": ("progressive", None),
    "progressive-no-eager": ("progressive", False),
    # one question at a time on the first `latency_limit` questions: latency without the
    # queueing and CPU contention of `concurrency` answers in flight (edges and cloud share the
    # machine's cores in this bench; they do not in a deployment)
    "latency-cloud": ("cloud", None), "latency-progressive": ("progressive", None)}
LATENCY_PHASES = ("latency-cloud", "latency-progressive")
VARIANTS = ("progressive", "progressive-no-eager")  # judged against "cloud"


@dataclass
class QualityConfig:
    cloud_model: str | None = None  # None → the server's default
    edge_models: list[str] | None = None  # None → the server's default ensemble models
    limit: int = 40  # questions (round-robin over categories); 0 → all
    suitable_only: bool = True  # only questions labelled as suiting a sketch
    categories: list[str] | None = None
    max_tokens: int = 320
    max_points: int = 6
    out_dir: Path = Path("bench-results")
    cache_dir: Path | None = None
    threads: int = 0
    backend: str = "engine"
    judge: bool = True
    adapter: Path | None = None  # expansion adapter for edge_models[0] (None → the shipped one)
    questions: Path | None = None  # JSONL like bench/questions.jsonl (None → that file)
    validate_limit: int = 8  # full-cloud answers the judge is validated on (5 pairs each)
    validate_only: bool = False  # stop after the validation (quality_judge.json)
    eager_compare: bool = True  # also run (and judge) the non-eager phase
    concurrency: int = 4  # requests in flight
    pairwise_pairs: int = 0  # validation pairs also judged by the A/B prompt (baseline)
    judge_no_eager: bool = False  # also judge the non-eager answers (else timed only)
    latency_limit: int = 6  # questions also answered one at a time, timed only (0: none)
    # the judge on its own greedy answers vs its samples at temperature 0.8 (validation items)
    self_preference: bool = True


@dataclass
class Row:
    id: str
    category: str
    variant: str
    ran: str  # mode that actually ran
    latency: float  # client side, request → full answer (s)
    first_text: float  # first section (progressive) or first token (cloud), server side (s)
    cloud_latency: float
    cloud_first_text: float
    ensemble: int
    repaired: int
    winners: dict[str, int]
    preference: float = 0.0  # > 0: the variant is better (variant shown first)
    verdict_variant_first: str = "tie"  # "first" | "second" | "tie"
    verdict_variant_second: str = "tie"
    verdict: str = "tie"  # win | tie | loss vs the full-cloud answer, both orders
    signals: dict[str, float] = field(default_factory=dict)
    profile_variant: dict[str, Any] = field(default_factory=dict)
    profile_cloud: dict[str, Any] = field(default_factory=dict)


def _settings(cfg: QualityConfig) -> ServeSettings:
    fields: dict[str, Any] = {"cache_dir": cfg.cache_dir, "threads": cfg.threads, "port": 0,
                              "default_max_tokens": cfg.max_tokens, "backend": cfg.backend,
                              "default_max_points": cfg.max_points,
                              # a given adapter replaces the shipped one (registered under the
                              # same name in _answers), so the shipped one is not loaded at all
                              "expander_adapter": cfg.adapter is None}
    if cfg.cloud_model is not None:
        fields["cloud_model"] = cfg.cloud_model
    if cfg.edge_models is not None:
        fields["edge_models"] = cfg.edge_models
    return ServeSettings(**fields)


def _questions(cfg: QualityConfig) -> list[dict[str, Any]]:
    rows = (load_questions(cfg.categories, 0) if cfg.questions is None else
            [json.loads(line) for line in cfg.questions.read_text().splitlines() if line])
    if cfg.suitable_only:
        rows = [q for q in rows if q["suits_sketch"]]
    return round_robin(rows, cfg.limit)


def _answers(cfg: QualityConfig, settings: ServeSettings, questions: list[dict[str, Any]],
             cache: Path, progress: bool) -> tuple[dict[str, dict[str, Any]],
                                                   TextGenerator | None]:
    """Every phase's answers (from the cache where they are), and the cloud model if loaded."""
    key = {"cloud": settings.cloud_model, "edges": settings.edge_models,
           "adapter": str(cfg.adapter), "max_tokens": cfg.max_tokens,
           "max_points": cfg.max_points}
    phases = [p for p in PHASES if (p != "progressive-no-eager" or cfg.eager_compare)
              and (p not in LATENCY_PHASES or cfg.latency_limit > 0)]
    asked = {p: questions[:cfg.latency_limit] if p in LATENCY_PHASES else questions
             for p in phases}
    paths = {p: cache_path(cache, p, key) for p in phases}
    out = {p: load_cache(paths[p]) for p in phases}
    if all(q["id"] in out[p] for p in phases for q in asked[p]):
        return out, None
    pipeline = build_pipeline(settings, Metrics(), progress)
    if cfg.adapter is not None:  # a given adapter instead of the shipped one
        first = settings.edge_models[0]
        pipeline.edge_generators[first].add_adapter(EXPANDER_ADAPTER, cfg.adapter)
        ens = pipeline.expander.cfg
        base = [s for s in ens.sources if s.adapter is None]
        sources = [Source(model=first, adapter=EXPANDER_ADAPTER), *base]
        pipeline.expander.cfg = ens.model_copy(update={"sources": sources, "k": len(sources)})
    server = Server(settings, pipeline)
    try:
        if cfg.concurrency == 1:
            # one at a time: the phases alternate question by question (cloud first on even
            # questions, last on odd ones), so a slow spell of the machine (seen: 20-40% over
            # tens of minutes on the same answers) weighs on both sides alike
            main = [p for p in phases if p not in LATENCY_PHASES]
            for j, q in enumerate(tqdm(questions, desc="answers (alternating)",
                                       unit="question", disable=not progress)):
                for p in (main if j % 2 == 0 else main[::-1]):
                    mode, eager = PHASES[p]
                    out[p] = generate(server, [q], p, mode, eager, paths[p], cfg.max_tokens,
                                      cfg.max_points, 1, progress=False)
        for p in phases:
            mode, eager = PHASES[p]
            out[p] = generate(server, asked[p], p, mode, eager, paths[p], cfg.max_tokens,
                              cfg.max_points, 1 if p in LATENCY_PHASES else cfg.concurrency,
                              progress)
    finally:
        server.close()
        pipeline.eager = None
    return out, pipeline.cloud


def _validation_items(questions: list[dict[str, Any]], cloud: dict[str, Any],
                      limit: int) -> list[tuple[str, str]]:
    """Full-cloud answers fit to be the known-better side: complete (no structural defect) and
    a list of three points or more."""
    fit = [(q["question"], cloud[q["id"]]["text"]) for q in questions if q["id"] in cloud
           and not any(defects(cloud[q["id"]]["text"]).values())
           and len(items(cloud[q["id"]]["text"])[1]) >= 3]
    return fit[:limit]


def _judge_rows(gen: TextGenerator, questions: list[dict[str, Any]],
                answers: dict[str, dict[str, Any]], variants: list[str],
                cache: dict[str, Any], progress: bool, save: Any) -> list[Row]:
    rows: list[Row] = []
    for q in tqdm(questions, desc="judge", unit="question", disable=not progress):
        ref = answers["cloud"][q["id"]]
        pc: Profile = profile(gen, q["question"], ref["text"], cache)
        for v in variants:
            a = answers[v][q["id"]]
            pv = profile(gen, q["question"], a["text"], cache)
            fwd, rev = compare(pv, pc), compare(pc, pv)  # variant shown first, then second
            verdict = ("win" if fwd.verdict == "first" and rev.verdict == "second" else
                       "loss" if fwd.verdict == "second" and rev.verdict == "first" else "tie")
            rows.append(Row(
                q["id"], q["category"], v, a["mode"], a["client_latency_s"],
                a["timings"].get("first_section", a["timings"]["ttft"]),
                ref["client_latency_s"], ref["timings"]["ttft"], a["ensemble"], a["repaired"],
                a["winners"], fwd.preference, fwd.verdict,
                {"first": "second", "second": "first"}.get(rev.verdict, "tie"), verdict,
                fwd.signals, pv.as_dict(), pc.as_dict()))
        save()
    return rows


def _agg(sel: list[Row]) -> dict[str, Any]:
    if not sel:
        return {}
    vs = [r.verdict for r in sel]
    # the answer shown first got the verdict: variant-first runs count "first", the others
    # "second" (what the variant got when shown second, seen from the cloud answer's side)
    firsts = [r.verdict_variant_first == "first" for r in sel] + [
        r.verdict_variant_second == "second" for r in sel]
    lat, cl = statistics.fmean(r.latency for r in sel), statistics.fmean(
        r.cloud_latency for r in sel)
    return {
        "questions": len(sel), "win": vs.count("win") / len(sel),
        "tie": vs.count("tie") / len(sel), "loss": vs.count("loss") / len(sel),
        "win_or_tie": (vs.count("win") + vs.count("tie")) / len(sel),
        "variant_first_win": statistics.fmean(r.verdict_variant_first == "first" for r in sel),
        "variant_second_win": statistics.fmean(r.verdict_variant_second == "first"
                                               for r in sel),
        "first_shown_wins": statistics.fmean(firsts),
        "ran_progressive": statistics.fmean(r.ran == "progressive" for r in sel),
        "latency_mean_s": lat, "cloud_latency_mean_s": cl, "latency_cut": 1 - lat / cl,
        "first_text_mean_s": statistics.fmean(r.first_text for r in sel),
        "cloud_first_token_mean_s": statistics.fmean(r.cloud_first_text for r in sel),
        "ensemble_mean": statistics.fmean(r.ensemble for r in sel),
        "repaired_points": sum(r.repaired for r in sel),
        "signals_mean": {s: statistics.fmean(r.signals.get(s, 0.0) for r in sel)
                         for s in sel[0].signals},
    }


def timing(answers: dict[str, dict[str, Any]], questions: list[dict[str, Any]]
           ) -> dict[str, Any]:
    """Per phase, over every question (judged or not): latency and first text."""
    out: dict[str, Any] = {}
    for phase, got in answers.items():
        recs = [got[q["id"]] for q in questions if q["id"] in got]
        if phase in LATENCY_PHASES:  # concurrency 1 on a subset: that subset only
            recs = [got[q["id"]] for q in questions if q["id"] in got
                    and q["id"] in answers.get(LATENCY_PHASES[0], {})
                    and q["id"] in answers.get(LATENCY_PHASES[1], {})]
        if not recs:
            continue
        first = [r["timings"].get("first_section", r["timings"]["ttft"]) for r in recs]
        out[phase] = {"questions": len(recs),
                      "latency_mean_s": statistics.fmean(r["client_latency_s"] for r in recs),
                      "latency_median_s": statistics.median(r["client_latency_s"]
                                                            for r in recs),
                      "first_text_mean_s": statistics.fmean(first),
                      "first_text_median_s": statistics.median(first),
                      "first_token_mean_s": statistics.fmean(r["timings"]["ttft"]
                                                             for r in recs),
                      "ran_progressive": statistics.fmean(r["mode"] == "progressive"
                                                          for r in recs),
                      "ensemble_mean": statistics.fmean(r["ensemble"] for r in recs),
                      "repaired_points": sum(r["repaired"] for r in recs)}
    eager, lazy = out.get("progressive"), out.get("progressive-no-eager")
    if eager and lazy:
        out["eager_vs_not"] = {
            "first_section_ratio": eager["first_text_mean_s"] / lazy["first_text_mean_s"],
            "first_section_median_ratio": eager["first_text_median_s"]
            / lazy["first_text_median_s"],
            "latency_ratio": eager["latency_mean_s"] / lazy["latency_mean_s"]}
    if eager and "cloud" in out:
        out["progressive_vs_cloud"] = {
            "latency_cut": 1 - eager["latency_mean_s"] / out["cloud"]["latency_mean_s"]}
    one, cloud_one = out.get("latency-progressive"), out.get("latency-cloud")
    if one and cloud_one:
        out["progressive_vs_cloud_concurrency_1"] = {
            "questions": min(one["questions"], cloud_one["questions"]),
            "latency_cut": 1 - one["latency_mean_s"] / cloud_one["latency_mean_s"],
            "first_text_vs_cloud_latency": one["first_text_mean_s"]
            / cloud_one["latency_mean_s"]}
    return out


def summarize(rows: list[Row], answers: dict[str, dict[str, Any]],
              questions: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"overall": {v: _agg([r for r in rows if r.variant == v])
                                       for v in VARIANTS}}
    for cat in dict.fromkeys(r.category for r in rows):
        out[cat] = {v: _agg([r for r in rows if r.variant == v and r.category == cat])
                    for v in VARIANTS}
    out["timing"] = timing(answers, questions)
    return out


def target(summary: dict[str, Any], trusted: bool) -> dict[str, Any]:
    """Progressive (ensemble + adapter) wins or ties on >= 50% of suitable questions against
    full cloud with a latency cut >= 40%, under a judge that passed its validation; time to
    first section <= 0.5x the non-eager run's."""
    s = summary["overall"]["progressive"]
    if not s:
        return {}
    ratio = summary["timing"].get("eager_vs_not", {}).get("first_section_ratio")
    one = summary["timing"].get("progressive_vs_cloud_concurrency_1", {})
    return {"questions": s["questions"], "win_or_tie": s["win_or_tie"],
            "latency_cut": s["latency_cut"], "judge_passed": trusted,
            "latency_cut_concurrency_1": one.get("latency_cut"),
            "first_section_vs_no_eager": ratio,
            "met": trusted and s["win_or_tie"] >= 0.5 and s["latency_cut"] >= 0.4,
            "first_section_met": ratio is not None and ratio <= 0.5}


def run_quality(cfg: QualityConfig, progress: bool = True) -> dict[str, Any]:
    settings = _settings(cfg)
    questions = _questions(cfg)
    cache = cfg.cache_dir or default_cache_dir()
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    answers, gen = _answers(cfg, settings, questions, cache, progress)
    gen_s = time.perf_counter() - t0
    result: dict[str, Any] = {"bench": "quality", "config": json.loads(json.dumps(
        asdict(cfg), default=str)), "questions": len(questions), "answers_s": gen_s,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()}}
    if not cfg.judge:
        result["timing"] = timing(answers, questions)
        (cfg.out_dir / "quality_answers.json").write_text(json.dumps(result, indent=1))
        return result
    gen = gen or load_generator(settings.cloud_model, settings, progress)
    judge_cache_file = cache / "bench-quality" / f"profiles-{Path(settings.cloud_model).name}.json"
    jcache: dict[str, Any] = load_cache(judge_cache_file)

    def save() -> None:
        judge_cache_file.parent.mkdir(parents=True, exist_ok=True)
        judge_cache_file.write_text(json.dumps(jcache))

    t1 = time.perf_counter()
    vitems = _validation_items(questions, answers["cloud"], cfg.validate_limit)
    # the self-preference control: the same model's samples of the validation questions
    # (decoded before the dense weights go in: those are for prefills)
    samples = [c.text for c in gen.generate(
        [gen.render_chat([{"role": "user", "content": q}]) for q, _ in vitems],
        SamplingParams(max_tokens=cfg.max_tokens, temperature=0.8, seed=0))
        ] if cfg.self_preference and vitems else []
    with dense_weights(gen):

        def partial(report: dict[str, Any]) -> None:
            save()
            (cfg.out_dir / "quality_judge.json").write_text(json.dumps(
                {**report, "items": len(vitems), "partial": True}, indent=1))

        validation = validate(gen, vitems, jcache, cfg.pairwise_pairs, on_row=partial)
        if samples:
            validation["self_preference"] = self_preference(gen, vitems, samples, jcache)
            save()
        validation.update(items=len(vitems), judge_model=settings.cloud_model,
                          seconds=time.perf_counter() - t1)
        (cfg.out_dir / "quality_judge.json").write_text(json.dumps(validation, indent=1))
        result["judge_validation"] = {k: v for k, v in validation.items() if k != "rows"}
        if cfg.validate_only:
            return result
        judged = [v for v in VARIANTS if v in answers
                  and (v == "progressive" or cfg.judge_no_eager)]
        rows = _judge_rows(gen, questions, answers, judged, jcache, progress, save)
    summary = summarize(rows, answers, questions)
    result.update(judge_s=time.perf_counter() - t1, summary=summary,
                  target=target(summary, validation["trusted"] is not None),
                  definitions={
                      "win": "the judge prefers the variant in both orders",
                      "loss": "the judge prefers the full-cloud answer in both orders",
                      "tie": "anything else (a tie, or a verdict that follows the position)",
                      "first_shown_wins": "share of verdicts given to the answer shown first",
                      "first_text": "progressive: first section; cloud: first token (server)",
                      "latency": "client side, request to full answer"},
                  rows=[asdict(r) for r in rows])
    (cfg.out_dir / "quality.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, cfg.out_dir / "quality.png")
    return result
