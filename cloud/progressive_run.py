"""The progressive run: the cloud model's sketch streams, each point goes to the client (a
PointEvent) the moment its line is complete, and — with eager dispatch — its expansion goes to
the edges at once, while the cloud writes the rest. Sections stream as they are decided; the
DoneEvent has them in order. A sketch with too few points is answered in full by the cloud; a
failed edge never loses a point (the cloud model expands what it did not deliver)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pice.cloud.aggregator import aggregate
from pice.cloud.ensemble import EnsembleStats, Picked
from pice.cloud.events import DoneEvent, Event, PointEvent, SectionEvent, SketchEvent
from pice.cloud.guard import clean, finish
from pice.cloud.plan import Plan
from pice.cloud.sketcher import SketchStream, sketch_messages
from pice.shared.aio import iterate_in_thread
from pice.shared.protocol import ExpansionResult, ExpansionTask
from pice.shared.sampling import SamplingParams
from pice.shared.worker import CLOUD_WORKER_ID

if TYPE_CHECKING:
    from pice.cloud.pipeline import Clock, Pipeline

log = logging.getLogger(__name__)


async def run_progressive(p: Pipeline, plan: Plan, clock: Clock) -> AsyncIterator[Event]:
    req, d = plan.req, plan.decision
    assert d is not None
    history = [m for m in req.messages[:-1] if m["role"] != "system"]
    prompt = p.cloud.render_chat(sketch_messages(req.question, d.max_points, d.words_per_point,
                                                 history))
    stream = SketchStream(d.max_points, d.words_per_point)
    outline = stream.points  # grows as the sketch streams (the guard reads it)
    inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stats = EnsembleStats()
    tasks: list[ExpansionTask] = []
    failed: list[ExpansionTask] = []
    running: set[asyncio.Task[None]] = set()
    sketch_out: dict[str, Any] = {}
    eager = p.eager_now()

    def task(i: int) -> ExpansionTask:
        return ExpansionTask(request_id=req.request_id, question=req.question,
                             sketch=list(outline), index=i, max_tokens=d.point_tokens,
                             temperature=req.temperature, seed=req.seed, adapter=req.adapter,
                             model=req.adapter_model)

    async def expand(group: list[ExpansionTask]) -> None:
        try:
            async for picked in p.expander.expand_points(
                    p.edges.dispatch, group, d.ensemble, list(d.placement), stats, outline):
                inbox.put_nowait(("picked", picked))
        except Exception as exc:  # a failed edge never loses the request
            log.warning("request %s: edge failed (%s)", req.request_id, exc)
            failed.extend(group)
        finally:
            inbox.put_nowait(("expanded", None))

    def launch(group: list[ExpansionTask]) -> None:
        clock.mark("dispatch")
        running.add(asyncio.create_task(expand(group)))

    async def sketch() -> None:
        """Stream the sketch; stop the cloud as soon as the sketch is full."""
        t0 = time.perf_counter()
        pieces: list[str] = []
        p.scheduler.cloud.start(req.priority)
        try:
            async for delta in iterate_in_thread(p.cloud.stream(prompt, SamplingParams(
                    max_tokens=d.sketch_tokens, temperature=0.0))):
                pieces.append(delta)
                for point in stream.feed(delta):
                    inbox.put_nowait(("point", point))
                if stream.full:
                    break
        finally:
            p.scheduler.cloud.finish(req.priority, 0, 0.0)
        text = "".join(pieces)
        sketch_out.update(text=text, tokens=p.cloud.count_tokens(text), seconds=clock.since(t0))
        p.scheduler.cloud.observe_rate(sketch_out["tokens"], sketch_out["seconds"])
        sent = len(outline)
        final = stream.close()  # the last line has no newline after it
        for point in final[sent:]:
            inbox.put_nowait(("point", point))
        inbox.put_nowait(("sketched", final))

    async def sketch_or_report() -> None:
        try:
            await sketch()
        except Exception as exc:  # the cloud failed: the caller raises it (typed → HTTP)
            inbox.put_nowait(("error", exc))

    sketcher = asyncio.create_task(sketch_or_report())
    results: dict[int, ExpansionResult] = {}
    sections: dict[int, SectionEvent] = {}
    held: list[Picked] = []  # sections wait until the sketch is sure to be used
    points: list[str] | None = None
    try:
        while points is None or running:
            kind, payload = await inbox.get()
            if kind == "error":
                raise payload
            if kind == "point":
                i = len(tasks)
                tasks.append(task(i))
                clock.first_output()
                yield PointEvent(i, payload)
                if eager:
                    launch([tasks[i]])
            elif kind == "sketched":
                points = payload
                if not points:
                    break
                yield SketchEvent(points)
                if not eager:
                    launch([task(i) for i in range(len(points))])
            elif kind == "picked":
                held.append(payload)
            elif kind == "expanded":
                running = {t for t in running if not t.done()}
            if len(outline) >= stream.min_points or points:
                for picked in held:
                    results[picked.result.index] = picked.result
                    sections[picked.result.index] = picked.section
                    clock.first_output()
                    clock.mark("first_section")
                    yield picked.section
                held.clear()
    finally:
        for t in [sketcher, *running]:
            t.cancel()
    if not points:
        log.info("request %s: no usable sketch in %r; answering in full", req.request_id,
                 sketch_out.get("text", "")[:200])
        p.metrics.fallbacks.labels("no usable sketch").inc()
        async for ev in p.cloud_answer(plan, "fallback: no usable sketch", clock,
                                       {"sketch": sketch_out["seconds"]}, sketch_out["tokens"]):
            yield ev
        return
    reason = d.reason
    missing = [t for t in failed if t.index not in results]
    # a point whose expansion never came back without a failure either (seen under load with
    # eager dispatch) is never lost: the cloud expands it like a failed edge's
    lost = [tasks[i] if i < len(tasks) else task(i) for i in range(len(points))
            if i not in results and all(t.index != i for t in missing)]
    if lost:
        log.warning("request %s: points %s came back from no edge; the cloud expands them",
                    req.request_id, [t.index for t in lost])
        missing += lost
    if missing:
        p.metrics.fallbacks.labels("edge failure").inc()
        if p.cloud_worker is None:
            async for ev in p.cloud_answer(plan, "fallback: edge failure", clock,
                                           {"sketch": sketch_out["seconds"]},
                                           sketch_out["tokens"]):
                yield ev
            return
        # the cloud expands the points the edge did not deliver; delivered ones stand
        full = [t.model_copy(update={"sketch": points}) for t in missing]
        for r in await asyncio.to_thread(p.cloud_worker.expand, full):
            r = _cleaned(r, points)
            results[r.index] = r
            sections[r.index] = SectionEvent(r.index, r.text, r.worker, r.mean_logprob,
                                             r.tokens)
            clock.first_output()
            clock.mark("first_section")
            yield sections[r.index]
        reason = f"{reason}; edge failure: {len(missing)} points expanded in the cloud"
    ordered = [results[i] for i in range(len(points))]
    cloud_expansion = sum(r.tokens for r in ordered if r.worker == CLOUD_WORKER_ID)
    sketch_s = sketch_out["seconds"]
    timings = {"sketch": sketch_s,
               "expansion": clock.since(clock.start) - clock.marks.get("dispatch", 0.0),
               "total": clock.since(clock.start), "ttft": clock.marks["ttft"],
               "first_section": clock.marks.get("first_section", clock.since(clock.start))}
    p.observe("progressive", req.endpoint, timings, sketch_out["tokens"] + cloud_expansion,
              stats.edge_tokens)
    yield DoneEvent(
        text=aggregate(points, ordered), mode="progressive", reason=reason, sketch=points,
        timings=timings, tokens={"prompt": p.cloud.count_tokens(prompt),
                                 "cloud": sketch_out["tokens"] + cloud_expansion,
                                 "edge": stats.edge_tokens},
        finish_reason="stop", sections=[sections[i] for i in range(len(points))],
        ensemble=stats.k, repaired=stats.repaired,
    )


def _cleaned(r: ExpansionResult, points: list[str]) -> ExpansionResult:
    """A cloud rescue's text, garbage removed and finished at a sentence end."""
    point = points[r.index]
    used, _ = clean(r, point, [q for i, q in enumerate(points) if i != r.index])
    return finish(used or r.model_copy(update={"text": ""}), point)
