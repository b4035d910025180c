"""Pipeline behaviour the API tests do not reach: fallbacks that never lose a request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

from pice.cloud.edge_pool import EdgePool
from pice.cloud.events import DoneEvent, Event, PointEvent, SectionEvent, SketchEvent
from pice.cloud.metrics import Metrics
from pice.cloud.pipeline import AnswerRequest, Pipeline
from pice.edge.expander import EdgeWorker
from pice.scheduler.policy import PolicyConfig
from pice.shared.hf_backend import HFGenerator
from pice.shared.protocol import ExpansionResult, ExpansionTask
from pice.shared.worker import CLOUD_WORKER_ID
from tests.conftest import SKETCH_QUESTIONS


class DeadWorker(EdgeWorker):
    """An edge whose device dies mid-request (failure injection around a real worker)."""

    def expand_iter(self, tasks: list[ExpansionTask]) -> Iterator[ExpansionResult]:
        raise ConnectionError("edge device went away")


def run(pipeline: Pipeline, question: str, mode: str = "progressive",
        max_tokens: int = 24) -> list[Event]:
    req = AnswerRequest("r1", [{"role": "user", "content": question}], max_tokens=max_tokens,
                        mode=mode)

    async def collect() -> list[Event]:
        return [ev async for ev in pipeline.run(req)]

    return asyncio.run(collect())


def test_no_usable_sketch_falls_back_to_full_cloud(tiny_generator: HFGenerator) -> None:
    # An untrained random model writes no numbered list.
    metrics = Metrics()
    pipeline = Pipeline(tiny_generator, EdgePool([EdgeWorker("e0", tiny_generator)]),
                        PolicyConfig(), metrics)
    events = run(pipeline, "How can I sleep better?")
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.mode == "cloud" and done.reason == "fallback: no usable sketch"
    assert not any(isinstance(e, SketchEvent) for e in events)
    assert done.tokens["cloud"] > 0 and "sketch" in done.timings
    assert metrics.fallbacks.labels("no usable sketch")._value.get() == 1


def test_dead_edge_falls_back_to_full_cloud(sketch_model_dir: Path) -> None:
    gen = HFGenerator(str(sketch_model_dir), max_context=1024)
    pipeline = Pipeline(gen, EdgePool([DeadWorker("e0", gen)]), PolicyConfig(), Metrics())
    events = run(pipeline, SKETCH_QUESTIONS[0])
    assert isinstance(events[0], PointEvent) and any(isinstance(e, SketchEvent) for e in events)
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.mode == "cloud" and done.reason == "fallback: edge failure"
    assert done.text  # the request was answered, not lost


class DiesAfterOne(EdgeWorker):
    """Delivers the first finished point, then the device goes away."""

    def expand_iter(self, tasks: list[ExpansionTask]) -> Iterator[ExpansionResult]:
        for result in super().expand_iter(tasks):
            yield result
            raise ConnectionError("edge device went away")


def test_points_of_a_dead_edge_are_expanded_in_the_cloud(sketch_model_dir: Path) -> None:
    gen = HFGenerator(str(sketch_model_dir), max_context=1024)
    # one dispatch for the whole sketch (eager dispatch sends each point alone: batches of one)
    pipeline = Pipeline(gen, EdgePool([DiesAfterOne("e0", gen)]), PolicyConfig(), Metrics(),
                        cloud_worker=EdgeWorker(CLOUD_WORKER_ID, gen), eager=False)
    events = run(pipeline, SKETCH_QUESTIONS[0], max_tokens=60)
    sections = [e for e in events if isinstance(e, SectionEvent)]
    assert sorted(s.index for s in sections) == [0, 1, 2]  # nothing lost, nothing twice
    assert [s.worker for s in sections].count("e0") == 1
    assert [s.worker for s in sections].count(CLOUD_WORKER_ID) == 2
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.mode == "progressive"
    assert done.reason.endswith("edge failure: 2 points expanded in the cloud")
    assert done.text.startswith("1. Fixed sleep schedule")


def test_progressive_sections_arrive_in_order(sketch_model_dir: Path) -> None:
    gen = HFGenerator(str(sketch_model_dir), max_context=1024)
    pipeline = Pipeline(gen, EdgePool([EdgeWorker("e0", gen)]), PolicyConfig(), Metrics(),
                        eager=False)  # one batch: its points finish in order
    events = run(pipeline, SKETCH_QUESTIONS[1], mode="auto", max_tokens=60)
    sections = [e for e in events if isinstance(e, SectionEvent)]
    assert [s.index for s in sections] == [0, 1, 2]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.mode == "progressive"
    assert done.timings["ttft"] <= done.timings["total"]
