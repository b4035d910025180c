"""One request, end to end: the scheduler decides, then either the cloud model answers in full,
or it sketches and the edge pool expands every point in one batch. Yields events as they happen."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pice.cloud.aggregator import aggregate
from pice.cloud.edge_pool import EdgePool
from pice.cloud.ensemble import EnsembleConfig, EnsembleStats, PointExpander
from pice.cloud.events import DeltaEvent, DoneEvent, Event, SectionEvent, SketchEvent
from pice.cloud.guard import GuardConfig
from pice.cloud.metrics import Metrics
from pice.cloud.sketcher import parse_sketch, sketch_messages
from pice.scheduler.policy import Decision, PolicyConfig, QueryFeatures
from pice.scheduler.service import Scheduler
from pice.shared.aio import iterate_in_thread
from pice.shared.backend import Message, TextGenerator
from pice.shared.protocol import ExpansionResult, ExpansionTask
from pice.shared.sampling import SamplingParams
from pice.shared.worker import CLOUD_WORKER_ID, ExpansionWorker

log = logging.getLogger(__name__)


@dataclass
class AnswerRequest:
    request_id: str
    messages: list[Message]
    max_tokens: int
    mode: str = "auto"
    max_points: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    endpoint: str = "chat"
    prompt_tokens: int | None = None  # filled in once by Pipeline.prompt_tokens
    adapter: str | None = None  # LoRA adapter (engine name) for the edge expansions
    adapter_model: str | None = None  # the edge model that adapter applies to
    priority: str = "interactive"  # "interactive" | "batch": batch yields the cloud queue


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)
    marks: dict[str, float] = field(default_factory=dict)

    def since(self, t0: float) -> float:
        return time.perf_counter() - t0

    def first_output(self) -> None:
        self.marks.setdefault("ttft", self.since(self.start))


class Pipeline:
    def __init__(self, cloud: TextGenerator, edges: EdgePool, policy: PolicyConfig,
                 metrics: Metrics, cloud_worker: ExpansionWorker | None = None,
                 edge_generators: dict[str, TextGenerator] | None = None,
                 scheduler: Scheduler | None = None,
                 ensemble: EnsembleConfig | None = None) -> None:
        self.cloud = cloud
        # ensemble candidates per point, selection and the quality guard (default: one candidate,
        # guard off)
        self.expander = PointExpander(
            ensemble or EnsembleConfig(k=1, guard=GuardConfig(enabled=False)), metrics,
            cloud_worker)
        # the dynamic policy over the shipped router unless the caller brings its own
        self.scheduler = scheduler or Scheduler.build("dynamic", policy)
        # in-process edge models by spec: they answer directly (`model` = edge model/adapter)
        self.edge_generators = dict(edge_generators or {})
        # expands points on the cloud model when an edge fails mid-answer (None: answer in full)
        self.cloud_worker = cloud_worker
        self.edges = edges
        self.policy = policy
        self.metrics = metrics

    def prompt_tokens(self, req: AnswerRequest) -> int:
        """Tokens of the conversation as the cloud model sees it (counted once per request)."""
        if req.prompt_tokens is None:
            req.prompt_tokens = self.cloud.count_tokens(self.cloud.render_chat(req.messages))
        return req.prompt_tokens

    def validate(self, req: AnswerRequest) -> None:
        """Admission: raise a 4xx error now rather than inside a stream."""
        self.cloud.check_fits(self.prompt_tokens(req), req.max_tokens)
        SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p)

    async def run(self, req: AnswerRequest) -> AsyncIterator[Event]:
        question = next(m["content"] for m in reversed(req.messages) if m["role"] == "user")
        prompt_tokens = self.prompt_tokens(req)
        features = QueryFeatures(question, req.mode, req.max_tokens, req.max_points,
                                 prompt_tokens, self.cloud.max_context, priority=req.priority,
                                 model=req.adapter_model, adapter=req.adapter)
        # the router embeds the question (MiniLM): off the event loop
        decision = await asyncio.to_thread(self.scheduler.decide, features,
                                           self.edges.snapshot())
        self.metrics.decisions.labels(decision.mode, decision.code).inc()
        clock = _Clock()
        events = (self._progressive(req, question, decision, clock)
                  if decision.mode == "progressive" else self._cloud(req, decision.reason, clock))
        async for ev in events:
            if isinstance(ev, DoneEvent) and ev.mode == decision.mode == "cloud":
                self.scheduler.observe_answer(features, decision, ev.tokens["cloud"])
            yield ev

    async def _cloud(self, req: AnswerRequest, reason: str, clock: _Clock,
                     sketch_timings: dict[str, float] | None = None,
                     sketch_tokens: int = 0) -> AsyncIterator[Event]:
        prompt = self.cloud.render_chat(req.messages)
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                                top_p=req.top_p, seed=req.seed, stop=req.stop)
        t0 = time.perf_counter()
        pieces: list[str] = []
        self.scheduler.cloud.start(req.priority)
        try:
            async for delta in iterate_in_thread(self.cloud.stream(prompt, params)):
                clock.first_output()
                pieces.append(delta)
                yield DeltaEvent(delta)
        finally:
            text = "".join(pieces)
            cloud_s = clock.since(t0)
            out_tokens = self.cloud.count_tokens(text)
            self.scheduler.cloud.finish(req.priority, out_tokens, cloud_s)
        timings = {**(sketch_timings or {}), "cloud": cloud_s, "total": clock.since(clock.start),
                   "ttft": clock.marks.get("ttft", clock.since(clock.start))}
        self._observe("cloud", req.endpoint, timings, cloud_tokens=out_tokens + sketch_tokens)
        yield DoneEvent(
            text=text, mode="cloud", reason=reason, sketch=[], timings=timings,
            tokens={"prompt": self.prompt_tokens(req),
                    "cloud": out_tokens + sketch_tokens, "edge": 0},
            finish_reason="length" if out_tokens >= req.max_tokens else "stop",
        )

    async def _progressive(self, req: AnswerRequest, question: str, decision: Decision,
                           clock: _Clock) -> AsyncIterator[Event]:
        history = [m for m in req.messages[:-1] if m["role"] != "system"]
        prompt = self.cloud.render_chat(sketch_messages(question, decision.max_points,
                                                        decision.words_per_point, history))
        t0 = time.perf_counter()
        self.scheduler.cloud.start(req.priority)
        try:
            [out] = await asyncio.to_thread(self.cloud.generate, [prompt], SamplingParams(
                max_tokens=decision.sketch_tokens, temperature=0.0))
        finally:
            self.scheduler.cloud.finish(req.priority, 0, 0.0)
        self.scheduler.cloud.observe_rate(out.completion_tokens, clock.since(t0))
        points = parse_sketch(out.text, decision.max_points, decision.words_per_point)
        sketch_s = clock.since(t0)
        if not points:
            log.info("request %s: no usable sketch in %r; answering in full", req.request_id,
                     out.text[:200])
            self.metrics.fallbacks.labels("no usable sketch").inc()
            async for ev in self._cloud(req, "fallback: no usable sketch", clock,
                                        {"sketch": sketch_s}, out.completion_tokens):
                yield ev
            return
        yield SketchEvent(points)
        tasks = [ExpansionTask(request_id=req.request_id, question=question, sketch=points,
                               index=i, max_tokens=decision.point_tokens,
                               temperature=req.temperature, seed=req.seed,
                               adapter=req.adapter, model=req.adapter_model)
                 for i in range(len(points))]
        t1 = time.perf_counter()
        results: dict[int, ExpansionResult] = {}
        picked: dict[int, SectionEvent] = {}  # sections with their candidates' scores
        stats = EnsembleStats()
        reason = decision.reason
        try:
            async for p in self.expander.expand_points(
                    self.edges.dispatch, tasks, getattr(decision, "ensemble", 1),
                    list(decision.placement), stats):
                results[p.result.index] = p.result
                picked[p.result.index] = p.section
                clock.first_output()
                yield p.section
        except Exception as exc:  # a failed edge never loses the request
            missing = [t for t in tasks if t.index not in results]
            log.warning("request %s: edge failed (%s); %d points left", req.request_id, exc,
                        len(missing))
            self.metrics.fallbacks.labels("edge failure").inc()
            if self.cloud_worker is None:
                async for ev in self._cloud(req, "fallback: edge failure", clock,
                                            {"sketch": sketch_s}, out.completion_tokens):
                    yield ev
                return
            # the cloud expands the points the edge did not deliver; delivered ones stand
            for r in await asyncio.to_thread(self.cloud_worker.expand, missing):
                results[r.index] = r
                clock.first_output()
                yield _section(r)
            reason = f"{reason}; edge failure: {len(missing)} points expanded in the cloud"
        expansion_s = clock.since(t1)
        ordered = [results[i] for i in range(len(points))]
        sections = [picked.get(r.index) or _section(r) for r in ordered]
        edge_tokens = stats.edge_tokens  # every candidate's, winners or not
        cloud_expansion_tokens = sum(r.tokens for r in ordered if r.worker == CLOUD_WORKER_ID)
        timings = {"sketch": sketch_s, "expansion": expansion_s, "total": clock.since(clock.start),
                   "ttft": clock.marks["ttft"]}
        self._observe("progressive", req.endpoint, timings,
                      out.completion_tokens + cloud_expansion_tokens, edge_tokens)
        yield DoneEvent(
            text=aggregate(points, ordered), mode="progressive", reason=reason,
            sketch=points, timings=timings,
            tokens={"prompt": out.prompt_tokens,
                    "cloud": out.completion_tokens + cloud_expansion_tokens, "edge": edge_tokens},
            finish_reason="stop", sections=sections, ensemble=stats.k, repaired=stats.repaired,
        )

    def _observe(self, mode: str, endpoint: str, timings: dict[str, float], cloud_tokens: int,
                 edge_tokens: int = 0) -> None:
        self.metrics.requests.labels(mode, endpoint).inc()
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.metrics.tokens.labels("cloud").inc(cloud_tokens)
        self.metrics.tokens.labels("edge").inc(edge_tokens)


def _section(r: ExpansionResult) -> SectionEvent:
    return SectionEvent(r.index, r.text, r.worker, r.mean_logprob, r.tokens)
