"""Streaming sketch and eager expansion with tiny models: each point reaches the client the
moment its sketch line is complete, and with eager dispatch its expansion starts while the cloud
is still writing the rest of the sketch (the cloud waits, after its first line, until the edge
has been called; without eager dispatch no edge is called before the sketch is done)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pice.cloud.edge_pool import EdgePool
from pice.cloud.events import DoneEvent, Event, PointEvent, SectionEvent, SketchEvent
from pice.cloud.metrics import Metrics
from pice.cloud.pipeline import AnswerRequest, Pipeline
from pice.edge.expander import EdgeWorker
from pice.scheduler.policy import PolicyConfig
from pice.shared.hf_backend import HFGenerator
from pice.shared.protocol import ExpansionResult, ExpansionTask
from pice.shared.sampling import SamplingParams
from tests.conftest import SKETCH_QUESTIONS

WAIT_S = 120.0  # generous: the cloud waits at most this long for the eager dispatch


class PausingCloud(HFGenerator):
    """The real tiny sketch model; its stream notes each line end in `log` and, when
    `pause_after_first_line`, waits there until `called` is set (by the edge)."""

    def __init__(self, path: str, log: list[str], called: threading.Event,
                 pause_after_first_line: bool) -> None:
        super().__init__(path, max_context=1024)
        self.log, self.called, self.pause = log, called, pause_after_first_line

    def stream(self, prompt: str, params: SamplingParams,
               adapter: str | None = None) -> Iterator[str]:
        lines = 0
        for delta in super().stream(prompt, params, adapter):
            yield delta
            if "\n" in delta:
                lines += delta.count("\n")
                self.log.append(f"line {lines}")
                if lines == 1 and self.pause:
                    self.called.wait(WAIT_S)
        self.log.append("sketch done")


class RecordingWorker(EdgeWorker):
    def __init__(self, worker_id: str, gen: HFGenerator, log: list[str],
                 called: threading.Event) -> None:
        super().__init__(worker_id, gen)
        self.log, self.called = log, called

    def expand_iter(self, tasks: list[ExpansionTask]) -> Iterator[ExpansionResult]:
        self.log.append("dispatch " + ",".join(str(t.index) for t in tasks))
        self.called.set()
        yield from super().expand_iter(tasks)


def answer(sketch_dir: Path, edge_dir: Path, eager: bool) -> tuple[list[Event], list[str]]:
    log: list[str] = []
    called = threading.Event()
    cloud = PausingCloud(str(sketch_dir), log, called, pause_after_first_line=eager)
    edge = RecordingWorker("e0", HFGenerator(str(edge_dir), max_context=1024), log, called)
    pipeline = Pipeline(cloud, EdgePool([edge]), PolicyConfig(), Metrics(), eager=eager)
    req = AnswerRequest("r1", [{"role": "user", "content": SKETCH_QUESTIONS[0]}], max_tokens=60,
                        mode="progressive")

    async def collect() -> list[Event]:
        return [ev async for ev in pipeline.run(req)]

    return asyncio.run(collect()), log


@pytest.mark.parametrize("eager", [True, False])
def test_points_stream_and_eager_dispatch_starts_before_the_sketch_ends(
        sketch_model_dir: Path, tiny_model_dir: Path, eager: bool) -> None:
    events, log = answer(sketch_model_dir, tiny_model_dir, eager)
    points = [e for e in events if isinstance(e, PointEvent)]
    assert [(p.index, p.text) for p in points] == [
        (0, "Fixed sleep schedule"), (1, "Dark quiet bedroom"), (2, "No screens late")]
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "PointEvent" and kinds[-1] == "DoneEvent"
    sketch_at = kinds.index("SketchEvent")
    assert all(events.index(p) < sketch_at for p in points)
    for s in (e for e in events if isinstance(e, SectionEvent)):  # a point before its section
        assert events.index(points[s.index]) < events.index(s)
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.mode == "progressive"
    assert sorted(s.index for s in done.sections) == [0, 1, 2]
    assert done.text.startswith("1. Fixed sleep schedule")
    assert done.timings["ttft"] <= done.timings["first_section"] <= done.timings["total"]
    first_dispatch = next(i for i, x in enumerate(log) if x.startswith("dispatch"))
    if eager:  # point 1 went out alone, before the cloud wrote its second line
        assert log[first_dispatch] == "dispatch 0"
        assert first_dispatch < log.index("sketch done")
        assert sorted(x for x in log if x.startswith("dispatch")) == [
            "dispatch 0", "dispatch 1", "dispatch 2"]
    else:  # one dispatch of every point, after the sketch
        assert log[first_dispatch:] == ["dispatch 0,1,2"]
        assert first_dispatch > log.index("sketch done")
    assert any(isinstance(e, SketchEvent) and e.points == [p.text for p in points]
               for e in events)


class FailingCloud(HFGenerator):
    """The tiny sketch model, failing after its first line of the sketch."""

    def stream(self, prompt: str, params: SamplingParams,
               adapter: str | None = None) -> Iterator[str]:
        for delta in super().stream(prompt, params, adapter):
            yield delta
            if "\n" in delta:
                raise RuntimeError("cloud model went away")


def test_a_failing_sketch_raises_instead_of_hanging(sketch_model_dir: Path,
                                                    tiny_model_dir: Path) -> None:
    cloud = FailingCloud(str(sketch_model_dir), max_context=1024)
    edge = EdgeWorker("e0", HFGenerator(str(tiny_model_dir), max_context=1024))
    pipeline = Pipeline(cloud, EdgePool([edge]), PolicyConfig(), Metrics())
    req = AnswerRequest("r1", [{"role": "user", "content": SKETCH_QUESTIONS[0]}], max_tokens=60,
                        mode="progressive")

    async def collect() -> list[Event]:
        return [ev async for ev in pipeline.run(req)]

    with pytest.raises(RuntimeError, match="cloud model went away"):
        asyncio.run(asyncio.wait_for(collect(), WAIT_S))
