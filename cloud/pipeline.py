"""One request, one way: `plan` (admission on the model that will answer, then the scheduler's
decision) and `execute` (an edge model answers directly, the cloud model answers in full, or the
cloud sketches while the edges expand: progressive_run.py). Yields events as they happen."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from pice.cloud.edge_pool import EdgePool, LocalEdge
from pice.cloud.ensemble import EnsembleConfig, PointExpander
from pice.cloud.events import DeltaEvent, DoneEvent, Event
from pice.cloud.guard import GuardConfig
from pice.cloud.metrics import Metrics
from pice.cloud.plan import AnswerRequest, Plan, Who
from pice.cloud.progressive_run import run_progressive
from pice.scheduler.policy import PolicyConfig, QueryFeatures
from pice.scheduler.service import Scheduler
from pice.shared.aio import iterate_in_thread
from pice.shared.backend import TextGenerator
from pice.shared.errors import BadRequestError
from pice.shared.sampling import SamplingParams
from pice.shared.worker import ExpansionWorker

__all__ = ["AnswerRequest", "Clock", "Pipeline", "Plan", "Who"]


@dataclass
class Clock:
    start: float = field(default_factory=time.perf_counter)
    marks: dict[str, float] = field(default_factory=dict)

    def since(self, t0: float) -> float:
        return time.perf_counter() - t0

    def mark(self, name: str) -> None:
        """The first time `name` happens (later calls keep the first)."""
        self.marks.setdefault(name, self.since(self.start))

    def first_output(self) -> None:
        self.mark("ttft")


class Pipeline:
    def __init__(self, cloud: TextGenerator, edges: EdgePool, policy: PolicyConfig,
                 metrics: Metrics, cloud_worker: ExpansionWorker | None = None,
                 edge_generators: dict[str, TextGenerator] | None = None,
                 scheduler: Scheduler | None = None,
                 ensemble: EnsembleConfig | None = None, eager: bool | None = None,
                 shared_cpu_ensemble: int = 2) -> None:
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
        # eager: a point's expansion is dispatched the moment its sketch line is complete, while
        # the cloud writes the rest (False: all points in one dispatch once the sketch is done;
        # None: eager unless every edge runs in this process, where eager expansions take the
        # sketch's own cores: measured at concurrency 6 on 2 cores, eager made the first section
        # 1.44x and the answer 1.47x slower than dispatching after the sketch, quality.json)
        self.eager = eager
        # candidates per point at most while every edge shares this process's cores and no
        # other request is being planned or answered (the ensemble then competes with the
        # sketch and with the other answers for the same cores: one candidate when any is)
        self.shared_cpu_ensemble = shared_cpu_ensemble
        self.busy = 0  # requests being planned or executed now

    def edges_share_cpu(self) -> bool:
        """Every edge is an in-process worker: the edges compute on the cloud model's cores."""
        edges = self.edges.edges()
        return bool(edges) and all(isinstance(e, LocalEdge) for e in edges)

    def eager_now(self) -> bool:
        return self.eager if self.eager is not None else not self.edges_share_cpu()

    def prompt_tokens(self, req: AnswerRequest) -> int:
        """Tokens of the conversation as the cloud model sees it (counted once per request)."""
        if req.prompt_tokens is None:
            req.prompt_tokens = self.cloud.count_tokens(self.cloud.render_chat(req.messages))
        return req.prompt_tokens

    def validate(self, req: AnswerRequest) -> None:
        """Admission on the cloud model: raise a 4xx error now rather than inside a stream."""
        self.cloud.check_fits(self.prompt_tokens(req), req.max_tokens)
        SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p)

    def edge_generator(self, spec: str) -> TextGenerator:
        gen = self.edge_generators.get(spec)
        if gen is None:
            raise BadRequestError(f"edge model {spec} is not served in-process here",
                                  field="model")
        return gen

    async def plan(self, req: AnswerRequest, who: Who | None = None) -> Plan:
        """Everything decided before anything runs: admission (4xx) on the model that answers,
        and, for the pipeline, the scheduler's decision."""
        who = who or Who()
        if who.edge_model is not None:
            gen = self.edge_generator(who.edge_model)
            req.prompt_tokens = gen.count_tokens(gen.render_chat(req.messages))
            gen.check_fits(req.prompt_tokens, req.max_tokens)
            SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                           top_p=req.top_p)
            return Plan(req, "edge", who)
        if who.adapter is not None:  # the progressive path applies it to the edge expansions
            req.adapter = who.adapter.engine_name
            req.adapter_model = who.adapter.base_model
        self.validate(req)
        features = QueryFeatures(req.question, req.mode, req.max_tokens, req.max_points,
                                 self.prompt_tokens(req), self.cloud.max_context,
                                 priority=req.priority, model=req.adapter_model,
                                 adapter=req.adapter)
        # the router embeds the question (MiniLM): off the event loop
        self.busy += 1
        try:
            decision = await asyncio.to_thread(self.scheduler.decide, features,
                                               self.edges.snapshot())
            others = self.busy - 1
        finally:
            self.busy -= 1
        if decision.mode == "progressive" and self.edges_share_cpu():
            cap = self.shared_cpu_ensemble if others == 0 else 1
            if decision.ensemble > cap:
                decision = dataclasses.replace(decision, ensemble=cap)
        self.metrics.decisions.labels(decision.mode, decision.code).inc()
        return Plan(req, decision.mode, who, decision, features)

    def execute(self, plan: Plan) -> AsyncIterator[Event]:
        """Run the plan; the events end with one DoneEvent."""
        if plan.route == "edge":
            return self._counted(self._edge(plan))
        if plan.route == "progressive":
            return self._counted(run_progressive(self, plan, Clock()))
        assert plan.decision is not None
        return self._counted(self.cloud_answer(plan, plan.decision.reason, Clock()))

    async def _counted(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """`events`, with the request counted in `busy` while they run."""
        self.busy += 1
        try:
            async for ev in events:
                yield ev
        finally:
            self.busy -= 1
            await cast(Any, events).aclose()  # a client gone mid-answer stops its work now

    async def run(self, req: AnswerRequest) -> AsyncIterator[Event]:
        """plan, then execute (no adapter question: the pipeline's own models)."""
        async for ev in self.execute(await self.plan(req)):
            yield ev

    async def cloud_answer(self, plan: Plan, reason: str, clock: Clock,
                           sketch_timings: dict[str, float] | None = None,
                           sketch_tokens: int = 0) -> AsyncIterator[Event]:
        """The cloud model answers in full (planned, or a progressive run's fallback)."""
        req = plan.req
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
        self.observe("cloud", req.endpoint, timings, cloud_tokens=out_tokens + sketch_tokens)
        if plan.route == "cloud" and plan.decision is not None and plan.features is not None:
            self.scheduler.observe_answer(plan.features, plan.decision, out_tokens)
        yield DoneEvent(
            text=text, mode="cloud", reason=reason, sketch=[], timings=timings,
            tokens={"prompt": self.prompt_tokens(req),
                    "cloud": out_tokens + sketch_tokens, "edge": 0},
            finish_reason="length" if out_tokens >= req.max_tokens else "stop",
        )

    async def _edge(self, plan: Plan) -> AsyncIterator[Event]:
        """The edge model answers in full (with the plan's adapter), streamed as deltas."""
        req, who = plan.req, plan.who
        assert who.edge_model is not None
        gen = self.edge_generator(who.edge_model)
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                                top_p=req.top_p, seed=req.seed, stop=req.stop)
        prompt = gen.render_chat(req.messages)
        name = who.adapter.engine_name if who.adapter is not None else None
        # only an engine with adapters takes `adapter` (the catalog holds only such models)
        source = cast(Any, gen).stream(prompt, params, adapter=name) if name else gen.stream(
            prompt, params)
        clock = Clock()
        pieces: list[str] = []
        async for delta in iterate_in_thread(source):
            clock.first_output()
            pieces.append(delta)
            yield DeltaEvent(delta)
        text = "".join(pieces)
        total = clock.since(clock.start)
        out_tokens = gen.count_tokens(text)
        self.metrics.requests.labels("edge", req.endpoint).inc()
        self.metrics.stage_seconds.labels("edge").observe(total)
        self.metrics.tokens.labels("edge").inc(out_tokens)
        reason = (f"edge model {who.edge_model} answers directly"
                  + (f" with adapter {who.ref}" if who.ref and who.adapter else ""))
        yield DoneEvent(text=text, mode="edge", reason=reason, sketch=[],
                        timings={"edge": total, "total": total,
                                 "ttft": clock.marks.get("ttft", total)},
                        tokens={"prompt": req.prompt_tokens or 0, "cloud": 0, "edge": out_tokens},
                        finish_reason="length" if out_tokens >= req.max_tokens else "stop")

    def observe(self, mode: str, endpoint: str, timings: dict[str, float], cloud_tokens: int,
                edge_tokens: int = 0) -> None:
        self.metrics.requests.labels(mode, endpoint).inc()
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.metrics.tokens.labels("cloud").inc(cloud_tokens)
        self.metrics.tokens.labels("edge").inc(edge_tokens)
