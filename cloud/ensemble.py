"""Ensemble expansion of one answer: k candidate tasks per point (each on another edge model
and/or adapter), the winner per point chosen as its candidates come in, and the guard's repairs
by the cloud model. The pipeline consumes `expand_points` like a plain dispatch."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pice.cloud.events import SectionEvent
from pice.cloud.guard import GuardConfig, clean, finish, off_point, verdict
from pice.cloud.metrics import Metrics
from pice.cloud.selection import CandidateScore, SelectionWeights, body, rank_key, select
from pice.shared.embeddings import Embedder, get_embedder
from pice.shared.protocol import ExpansionResult, ExpansionTask
from pice.shared.worker import CLOUD_WORKER_ID, ExpansionWorker

log = logging.getLogger(__name__)

Repair = tuple[ExpansionResult, list["CandidateScore"], str]  # (pick, scores, why)
RETRY_SOURCES = 2  # a point to repair is sampled again on at most this many of its sources
RETRY_TEMPERATURE = 0.8
# EdgePool.dispatch: tasks and {task position: edge id} → results as they arrive
Dispatch = Callable[[list[ExpansionTask], Mapping[int, str]], AsyncIterator[ExpansionResult]]


class Source(BaseModel):
    """Where one candidate runs: an edge model (None → any) and an adapter (None → base)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str | None = None
    adapter: str | None = None


class EnsembleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # where candidates 0, 1, … run, in order of preference
    sources: list[Source] = Field(default_factory=lambda: [Source()], min_length=1)
    k: int = Field(3, ge=1, le=16)  # candidates per point when the scheduler sets none
    weights: SelectionWeights = Field(default_factory=SelectionWeights)
    guard: GuardConfig = Field(default_factory=GuardConfig)


def ensemble_tasks(tasks: list[ExpansionTask], k: int,
                   sources: list[Source]) -> list[ExpansionTask]:
    """min(k, len(sources)) candidates of every point; candidate c runs sources[c]. Tasks that
    already name a model or adapter (the client asked for it) run as they are, alone."""
    if any(t.model is not None or t.adapter is not None for t in tasks):
        return list(tasks)
    k = max(1, min(k, len(sources)))
    return [t.model_copy(update={"candidate": c, "model": sources[c].model,
                                 "adapter": sources[c].adapter})
            for t in tasks for c in range(k)]


@dataclass
class Picked:
    """A point's final expansion, and its section event."""

    result: ExpansionResult
    section: SectionEvent


@dataclass
class EnsembleStats:
    k: int = 1
    edge_tokens: int = 0  # every candidate's tokens, winners or not
    repaired: list[dict[str, object]] = field(default_factory=list)
    # the bodies of the sections decided so far, so a later one does not say their sentences
    said: list[str] = field(default_factory=list)


def _section(r: ExpansionResult, scores: list[CandidateScore], repaired: str | None
             ) -> SectionEvent:
    winner = next((s for s in scores if s.candidate == r.candidate and s.worker == r.worker),
                  None)
    return SectionEvent(r.index, r.text, r.worker, r.mean_logprob, r.tokens, model=r.model,
                        adapter=r.adapter, candidate=r.candidate,
                        score=winner.score if winner else None,
                        candidates=[s.as_dict() for s in scores], repaired=repaired)


class _Latest(dict[int, ExpansionTask]):
    """Tasks by point index, each seen with the whole sketch as far as it is written when it is
    looked up (the guard judges a point against every other point)."""

    def __init__(self, tasks: dict[int, ExpansionTask], outline: list[str] | None) -> None:
        super().__init__(tasks)
        self.outline = outline

    def __getitem__(self, index: int) -> ExpansionTask:
        t = super().__getitem__(index)
        if self.outline is not None and len(self.outline) > len(t.sketch):
            return t.model_copy(update={"sketch": list(self.outline)})
        return t


class PointExpander:
    """Runs one answer's expansion through `dispatch` and yields one Picked per point."""

    def __init__(self, cfg: EnsembleConfig, metrics: Metrics,
                 cloud_worker: ExpansionWorker | None,
                 embedder: Callable[[], Embedder] = get_embedder) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.cloud_worker = cloud_worker
        self.embedder = embedder

    async def expand_points(self, dispatch: Dispatch, tasks: list[ExpansionTask], k: int,
                            placement: list[str], stats: EnsembleStats,
                            outline: list[str] | None = None) -> AsyncIterator[Picked]:
        """`tasks`: one per point; `placement`: the scheduler's edge per point (its candidates
        go there when that edge runs their model). A point is decided once all its candidates
        are in; if the dispatch fails, points with some candidates are decided on those (the
        exception then propagates, and the caller handles the points with none). `outline`: the
        whole sketch as it grows (eager dispatch sends points before the sketch is complete),
        so the guard sees every other point; None → each task's own sketch."""
        candidates = ensemble_tasks(tasks, k, self.cfg.sources)
        edge_of = dict(enumerate(placement))
        where = {pos: edge_of[t.index] for pos, t in enumerate(candidates) if t.index in edge_of}
        stats.k = len(candidates) // max(1, len(tasks))
        expected = {t.index: 0 for t in tasks}
        for t in candidates:
            expected[t.index] += 1
        base = _Latest({t.index: t for t in tasks}, outline)
        arrived: dict[int, list[ExpansionResult]] = {}
        repairs: list[Repair] = []
        try:
            async for r in dispatch(candidates, where):
                if r.worker != CLOUD_WORKER_ID:
                    stats.edge_tokens += r.tokens
                got = arrived.setdefault(r.index, [])
                got.append(r)
                if len(got) == expected[r.index]:
                    picked = await self._decide(base[r.index], arrived.pop(r.index), repairs,
                                               stats)
                    if picked is not None:
                        yield picked
        except Exception:
            for index in sorted(arrived):  # decide what did arrive; the rest is the caller's
                picked = await self._decide(base[index], arrived.pop(index), repairs, stats)
                if picked is not None:
                    yield picked
            async for picked in self._repair(repairs, base, stats):
                yield picked
            raise
        async for picked in self._repair(repairs, base, stats, dispatch, stats.k):
            yield picked

    async def _decide(self, task: ExpansionTask, got: list[ExpansionResult],
                      repairs: list[Repair], stats: EnsembleStats) -> Picked | None:
        """The best-scoring candidate that is not garbage (trimmed to its good part when it
        needed it); a point with none, or whose pick fails the guard, goes to `repairs`."""
        point = task.sketch[task.index]
        got.sort(key=lambda r: r.candidate)
        others = [p for i, p in enumerate(task.sketch) if i != task.index]
        _, scores = await asyncio.to_thread(select, task.question, point, got,
                                            self.embedder(), self.cfg.weights, others)
        by_candidate = {(s.candidate, s.worker): s for s in scores}
        ranked = sorted(got, key=lambda r: (
            -rank_key(by_candidate[(r.candidate, r.worker)], body(r, point)), r.candidate))
        guard = self.cfg.guard
        if not guard.enabled:  # sections pass through untouched
            top = ranked[0]
            self.metrics.ensemble_wins.labels(top.model, top.adapter or "").inc()
            return Picked(top, _section(top, scores, None))
        first_problem: tuple[ExpansionResult, str] | None = None
        for r in ranked:
            score = by_candidate[(r.candidate, r.worker)]
            used, why = clean(r, point, others, stats.said)
            if used is not None and why is None and off_point(score, guard):
                used, why = None, "off point"
            if used is None:
                assert why is not None
                first_problem = first_problem or (r, why)
                continue
            self.metrics.ensemble_wins.labels(used.model, used.adapter or "").inc()
            bad = verdict(used, point, score.score, guard)
            if bad is not None and (self.cloud_worker is not None or bad != "low score"):
                repairs.append((used, scores, bad))
                return None
            if why is not None:  # garbage trimmed away: what is left stands
                self._count(task.index, why, score.score, "trim", stats)
            final = finish(used, point)
            stats.said.append(body(final, point))
            return Picked(final, _section(final, scores, why))
        assert first_problem is not None
        r, why = first_problem
        repairs.append((r, scores, why))  # every candidate was garbage
        return None

    def _count(self, index: int, why: str, score: float | None, by: str,
               stats: EnsembleStats) -> None:
        self.metrics.guard_repairs.labels(why).inc()
        stats.repaired.append({"index": index, "reason": why, "score": score, "by": by})
        log.info("guard: point %d (%s) repaired by %s", index, why, by)

    def _retry_tasks(self, todo: list[Repair], base: dict[int, ExpansionTask], k: int
                     ) -> list[ExpansionTask]:
        """Per point to repair: one new candidate on each of the sources its candidates ran
        (at most RETRY_SOURCES), sampled (temperature RETRY_TEMPERATURE, a seed of its own),
        and, while fewer ran, on the next unused source. Greedy decoding of the same source
        would write the same text; the default third source (gemma-3-270m) mostly writes the
        bare title, so it is not asked once two sources ran."""
        sources = self.cfg.sources
        used = sources[:max(1, min(k, RETRY_SOURCES))]
        fresh = sources[k:k + 1] if k < min(len(sources), RETRY_SOURCES) else []
        tasks: list[ExpansionTask] = []
        for r, _, _ in todo:
            t = base[r.index]
            if t.model is not None or t.adapter is not None:  # pinned by the client
                continue
            for j, src in enumerate([*used, *fresh]):
                sampled = j < len(used)
                tasks.append(t.model_copy(update={
                    "candidate": k + j, "model": src.model, "adapter": src.adapter,
                    "temperature": max(t.temperature, RETRY_TEMPERATURE) if sampled
                    else t.temperature,
                    "seed": (t.seed or 0) + 7919 * (j + 1) if sampled else t.seed}))
        return tasks

    async def _retry_on_edges(self, todo: list[Repair], base: dict[int, ExpansionTask],
                              stats: EnsembleStats, dispatch: Dispatch, k: int
                              ) -> AsyncIterator[Picked]:
        """Before the cloud: each point to repair is expanded once more on the edges
        (`_retry_tasks`, one batch). The best retry that is clean and passes the guard's
        verdict stands (its item leaves `todo`); the rest stays for the cloud. An edge token
        costs about a third of a cloud token's compute here, and the cloud's repairs were the
        largest share of a progressive answer's time (9 repairs in 12 answers, +10-25 s each,
        bench quality at concurrency 1)."""
        if not self.cfg.guard.enabled:
            return
        tasks = self._retry_tasks(todo, base, k)
        if not tasks:
            return
        got: dict[int, list[ExpansionResult]] = {}
        try:
            async for r in dispatch(tasks, {}):
                stats.edge_tokens += r.tokens
                got.setdefault(r.index, []).append(r)
        except Exception as exc:  # the cloud still repairs what did not come back
            log.info("guard: edge retry failed (%s); the cloud repairs", exc)
        for item in list(todo):
            r0, scores, why = item
            task = base[r0.index]
            point = task.sketch[r0.index]
            others = [p for i, p in enumerate(task.sketch) if i != r0.index]
            usable = [u for u in (clean(r, point, others, stats.said)[0]
                                  for r in got.get(r0.index, [])) if u is not None]
            if not usable:
                continue
            _, found = await asyncio.to_thread(select, task.question, point, usable,
                                               self.embedder(), self.cfg.weights, others)
            ok = [(rank_key(sc, body(u, point)), u, sc) for u, sc in zip(usable, found,
                                                                          strict=True)
                  if not off_point(sc, self.cfg.guard)
                  and verdict(u, point, sc.score, self.cfg.guard) is None]
            if not ok:
                continue
            _, used, score = max(ok, key=lambda x: (x[0], -x[1].candidate))
            todo.remove(item)
            final = finish(used, point)
            stats.said.append(body(final, point))
            self._count(r0.index, why, score.score, used.worker, stats)
            yield Picked(final, _section(final, [*scores, *found], why))

    async def _repair(self, repairs: list[Repair], base: dict[int, ExpansionTask],
                      stats: EnsembleStats, dispatch: Dispatch | None = None, k: int = 1
                      ) -> AsyncIterator[Picked]:
        """The guard's points: first expanded once more on the edges (`_retry_tasks` through
        `dispatch`; `k` candidates ran), then what is still wrong, low scores aside unless
        `cloud_for_low_score`, re-expanded by the cloud model in one batch (when the guard is on
        and there is a cloud worker); whatever comes back is cleaned and finished at a sentence
        end; a low score no one beat keeps its edge text, and a point with nothing usable left
        keeps only its title."""
        if not repairs:
            return
        todo, repairs[:] = list(repairs), []
        if dispatch is not None:
            async for picked in self._retry_on_edges(todo, base, stats, dispatch, k):
                yield picked
        if not todo:
            return
        fixed: dict[int, ExpansionResult] = {}
        # a clean section that merely scores low keeps its text unless the guard is told to
        # spend a cloud pass on it (garbage, empty and cut-off sections always get one)
        cloud_todo = [(r, sc, why) for r, sc, why in todo
                      if why != "low score" or self.cfg.guard.cloud_for_low_score]
        if self.cloud_worker is not None and self.cfg.guard.enabled and cloud_todo:
            tasks = [base[r.index].model_copy(update={
                "max_tokens": int(base[r.index].max_tokens * self.cfg.guard.repair_token_factor),
                "model": None, "adapter": None, "candidate": 0}) for r, _, _ in cloud_todo]
            fixed = {r.index: r for r in
                     await asyncio.to_thread(self.cloud_worker.expand, tasks)}
        for r, scores, why in todo:
            task = base[r.index]
            point = task.sketch[r.index]
            others = [p for i, p in enumerate(task.sketch) if i != r.index]
            used, by = None, "title"
            if r.index in fixed:
                used, _ = clean(fixed[r.index], point, others, stats.said)
                by = fixed[r.index].worker
            if used is None and why == "low score":
                # the cloud's text was no better: the edge's own clean pick stands, never
                # the bare title in its place
                used, _ = clean(r, point, others, stats.said)
                by = "kept"
            if used is None or not body(used, point):  # nothing usable: the title alone
                used, by = r.model_copy(update={"text": "", "finish_reason": "stop"}), "title"
            final = finish(used, point)
            stats.said.append(body(final, point))
            best = next(s for s in scores if s.candidate == r.candidate)
            self._count(r.index, why, best.score, by, stats)
            yield Picked(final, _section(final, scores, why))


class PinnedEnsemble:
    """A scheduler whose progressive decisions run exactly k candidates per point (benchmarks
    and operators comparing ensemble sizes); everything else is the wrapped scheduler's."""

    def __init__(self, scheduler: Any, k: int) -> None:
        self.inner = scheduler
        self.k = k

    def decide(self, q: Any, edges: Any) -> Any:
        d = self.inner.decide(q, edges)
        return dataclasses.replace(d, ensemble=self.k) if d.mode == "progressive" else d

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
