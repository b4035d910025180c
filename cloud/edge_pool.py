"""The cloud's single dispatch point for point expansion: in-process workers and remote edge
agents (through the edge hub) behind one `dispatch`. Placement by model, adapter, an optional
per-point edge choice and load; backpressure by slots; a failed edge's points move to another
edge; duplicate results are dropped."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, cast

from pice.cloud.edge_base import DeadlineConfig, Edge, EdgeLost, EdgeStats, SlotGate
from pice.scheduler.state import EdgeState
from pice.shared.aio import iterate_in_thread
from pice.shared.protocol import ExpansionResult, ExpansionTask
from pice.shared.worker import ExpansionWorker

if TYPE_CHECKING:
    from pice.cloud.edge_hub import EdgeHub

log = logging.getLogger(__name__)

LOCAL_SLOTS = 64  # in-process workers batch continuously; this caps what one holds at once

ResultKey = tuple[str, int, int]  # (request_id, index, candidate)


def result_key(x: ExpansionTask | ExpansionResult) -> ResultKey:
    return (x.request_id, x.index, x.candidate)


class NoEdgeAvailableError(RuntimeError):
    """Some points could not be expanded by any live edge (the pipeline falls back to the
    cloud for them)."""

    def __init__(self, tasks: list[ExpansionTask]) -> None:
        super().__init__(f"{len(tasks)} point(s) found no live edge that runs their model")
        self.tasks = tasks


class LocalEdge:
    """An in-process worker seen as an edge (no batch deadline: it shares the server's process,
    so it cannot stall without the server stalling too)."""

    in_process = True

    def __init__(self, worker: ExpansionWorker, slots: int = LOCAL_SLOTS) -> None:
        self.worker = worker
        self.edge_id = worker.worker_id
        self.gate = SlotGate(slots)
        self.stats = EdgeStats()
        name = getattr(getattr(worker, "generator", None), "name", None)
        self.models: tuple[str, ...] = (name,) if isinstance(name, str) else ()

    def state(self) -> EdgeState:
        resident = getattr(getattr(self.worker, "generator", None), "resident_adapters", None)
        adapters = frozenset(resident()) if callable(resident) else frozenset()
        return EdgeState(self.edge_id, self.models, self.gate.slots, self.gate.inflight,
                         self.stats.tokens_per_s, 0.0, adapters,
                         healthy=self.gate.closed is None and not self.stats.suspect,
                         failure_rate=self.stats.failure_rate)

    def accepts(self, task: ExpansionTask) -> bool:
        # in-process workers share the server's adapter store, so any adapter can be loaded
        return task.model is None or not self.models or task.model in self.models

    async def run(self, tasks: list[ExpansionTask]) -> AsyncIterator[ExpansionResult]:
        async for r in iterate_in_thread(self.worker.expand_iter(tasks)):
            yield r


class EdgePool:
    def __init__(self, workers: Sequence[ExpansionWorker], hub: EdgeHub | None = None,
                 deadlines: DeadlineConfig | None = None) -> None:
        self.workers = list(workers)
        self.local = [LocalEdge(w) for w in self.workers]
        self.hub = hub  # remote agents (None: in-process workers only)
        self.deadlines = deadlines or DeadlineConfig()
        self.batches_inflight = 0  # batches sent to edges and not finished
        self.deadlines_missed = 0  # batches whose deadline ran out (their points moved)

    def edges(self) -> list[Edge]:
        remote: Iterable[Edge] = self.hub.edges() if self.hub is not None else ()
        return [*self.local, *remote]

    def snapshot(self) -> tuple[EdgeState, ...]:
        """Every known edge, in-process and remote, as the scheduler sees it."""
        return tuple(e.state() for e in self.edges())

    @property
    def available(self) -> int:
        """Edges that can take work now."""
        return sum(1 for e in self.edges() if e.state().healthy)

    def _assign(self, tasks: list[ExpansionTask], placement: Mapping[int, str],
                exclude: set[str]) -> tuple[dict[str, list[ExpansionTask]], list[ExpansionTask]]:
        """Tasks per edge id, and the tasks no live edge accepts. The placement's choice wins
        when that edge is live and accepts the task; otherwise the least-loaded edge does."""
        live = {e.edge_id: e for e in self.edges()
                if e.state().healthy and e.edge_id not in exclude}
        load = {eid: e.gate.inflight for eid, e in live.items()}
        shares: dict[str, list[ExpansionTask]] = {}
        orphans: list[ExpansionTask] = []
        for pos, task in enumerate(tasks):
            chosen = live.get(placement.get(pos, ""))
            if chosen is None or not chosen.accepts(task):
                fits = [e for e in live.values() if e.accepts(task)]
                if not fits:
                    orphans.append(task)
                    continue
                chosen = min(fits, key=lambda e: (load[e.edge_id] + 1) / e.gate.slots)
            load[chosen.edge_id] += 1
            shares.setdefault(chosen.edge_id, []).append(task)
        return shares, orphans

    async def dispatch(self, tasks: list[ExpansionTask],
                       placement: Mapping[int, str] | None = None,
                       ) -> AsyncIterator[ExpansionResult]:
        """Each edge's share runs as one batch (within its free slots), all edges at once; each
        result is yielded as it arrives. Points of a failed edge move to another live edge;
        those no edge can take raise NoEdgeAvailableError after every other result is in.
        `placement` maps a task's position to the edge id the scheduler chose for it."""
        queue: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        runners: set[asyncio.Task[None]] = set()
        failed: set[str] = set()
        seen: set[ResultKey] = set()
        by_id = {e.edge_id: e for e in self.edges()}
        shares, orphans = self._assign(tasks, placement or {}, failed)

        def launch(shares: dict[str, list[ExpansionTask]]) -> None:
            for eid, share in shares.items():
                t = asyncio.create_task(self._run_share(by_id[eid], share, queue))
                runners.add(t)
                t.add_done_callback(lambda t: queue.put_nowait(("exit", t)))

        launch(shares)
        try:
            while runners:
                kind, payload = await queue.get()
                if kind == "exit":
                    assert isinstance(payload, asyncio.Task)
                    runners.discard(payload)
                elif kind == "result":
                    assert isinstance(payload, ExpansionResult)
                    if result_key(payload) in seen:
                        log.info("dropped duplicate result %s from %s", result_key(payload),
                                 payload.worker)
                        continue
                    seen.add(result_key(payload))
                    yield payload
                else:  # "lost": (edge id, undelivered tasks)
                    eid, lost = cast(tuple[str, list[ExpansionTask]], payload)
                    failed.add(eid)
                    left = [t for t in lost if result_key(t) not in seen]
                    by_id.update({e.edge_id: e for e in self.edges()})
                    again, more = self._assign(left, {}, failed)
                    log.warning("edge %s lost %d point(s); %d moved to %s", eid, len(left),
                                len(left) - len(more), sorted(again) or "no edge")
                    orphans.extend(more)
                    launch(again)
        finally:
            for t in runners:
                t.cancel()
        if orphans:
            raise NoEdgeAvailableError(orphans)

    async def _run_share(self, edge: Edge, share: list[ExpansionTask],
                         queue: asyncio.Queue[tuple[str, object]]) -> None:
        """Reserve slots (waiting when none are free) and run the share in batches that fit."""
        pending = list(share)
        batches: list[asyncio.Task[None]] = []
        try:
            while pending:
                k = await edge.gate.reserve(len(pending))
                batch, pending = pending[:k], pending[k:]
                batches.append(asyncio.create_task(self._run_batch(edge, batch, queue)))
        except EdgeLost as exc:
            edge.stats.observe_failures(len(pending))
            queue.put_nowait(("lost", (edge.edge_id, pending)))
            log.warning("edge %s gone before its batch started: %s", edge.edge_id, exc)
        finally:
            if batches:
                await asyncio.gather(*batches, return_exceptions=True)

    async def _run_batch(self, edge: Edge, batch: list[ExpansionTask],
                         queue: asyncio.Queue[tuple[str, object]]) -> None:
        held = len(batch)  # slots reserved for this batch, released as points finish
        undelivered = {result_key(t): t for t in batch}
        # a remote edge that stops answering (alive, heartbeating) must not hold points forever:
        # on its deadline the batch is closed (the hub cancels it on the edge) and its points move
        limit = None if getattr(edge, "in_process", False) else \
            self.deadlines.seconds(edge.stats, batch)
        deadline = asyncio.timeout(limit)
        self.batches_inflight += 1
        try:
            async with deadline:
                async for r in edge.run(batch):
                    if undelivered.pop(result_key(r), None) is None:
                        continue  # not ours, or twice
                    held -= 1
                    edge.gate.release(1)
                    edge.stats.observe_result(r)
                    queue.put_nowait(("result", r))
        except Exception as exc:  # the edge failed or missed its deadline: its points move on
            if deadline.expired():
                self.deadlines_missed += 1
                edge.stats.observe_deadline_missed(self.deadlines.suspect_s)
                log.warning("edge %s missed its %.1fs deadline; %d point(s) undelivered, the "
                            "edge takes no work for %gs", edge.edge_id, limit, len(undelivered),
                            self.deadlines.suspect_s)
            else:
                log.warning("edge %s failed mid-batch (%s: %s); %d point(s) undelivered",
                            edge.edge_id, type(exc).__name__, exc, len(undelivered))
        finally:
            self.batches_inflight -= 1
            edge.gate.release(held)
        if undelivered:
            edge.stats.observe_failures(len(undelivered))
            queue.put_nowait(("lost", (edge.edge_id, list(undelivered.values()))))
