"""EdgePool dispatch over in-process workers (the remote side is in test_edge_hub.py and
tests/edge/test_agent.py): model routing, the scheduler's placement, re-dispatch of a failed
edge's points, no live edge → NoEdgeAvailableError, and the snapshot."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from pice.cloud.edge_pool import EdgePool, NoEdgeAvailableError
from pice.edge.expander import EdgeWorker
from pice.shared.hf_backend import HFGenerator
from pice.shared.protocol import ExpansionResult, ExpansionTask


class Named(HFGenerator):
    """The tiny model under another model spec."""

    def __init__(self, path: Path, name: str) -> None:
        super().__init__(str(path), max_context=1024)
        self.name = name


class DiesAfterOne(EdgeWorker):
    def expand_iter(self, tasks: list[ExpansionTask]) -> Iterator[ExpansionResult]:
        for result in super().expand_iter(tasks):
            yield result
            raise ConnectionError("edge device went away")


def tasks(n: int, model: str | None = None) -> list[ExpansionTask]:
    return [ExpansionTask(request_id="r", question="q?", sketch=[f"p{i}" for i in range(n)],
                          index=i, max_tokens=4, model=model) for i in range(n)]


def collect(pool: EdgePool, ts: list[ExpansionTask],
            placement: dict[int, str] | None = None) -> list[ExpansionResult]:
    async def run() -> list[ExpansionResult]:
        return [r async for r in pool.dispatch(ts, placement)]

    return asyncio.run(run())


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path) -> tuple[Named, Named]:
    return Named(tiny_model_dir, "model-x"), Named(tiny_model_dir, "model-y")


def test_tasks_go_only_to_edges_running_their_model(pair: tuple[Named, Named]) -> None:
    pool = EdgePool([EdgeWorker("ex", pair[0]), EdgeWorker("ey", pair[1])])
    out = collect(pool, tasks(4, model="model-y"))
    assert sorted(r.index for r in out) == [0, 1, 2, 3]
    assert {r.worker for r in out} == {"ey"}
    with pytest.raises(NoEdgeAvailableError, match="4 point"):
        collect(pool, tasks(4, model="model-z"))


def test_placement_is_honoured_and_load_spreads_without_it(pair: tuple[Named, Named]) -> None:
    pool = EdgePool([EdgeWorker("e0", pair[0]), EdgeWorker("e1", pair[0])])
    out = collect(pool, tasks(3), placement={0: "e1", 1: "e1", 2: "e0"})
    assert {r.index: r.worker for r in out} == {0: "e1", 1: "e1", 2: "e0"}
    assert {r.worker for r in collect(pool, tasks(4))} == {"e0", "e1"}


def test_failed_edge_points_move_to_another_edge(pair: tuple[Named, Named]) -> None:
    pool = EdgePool([DiesAfterOne("bad", pair[0]), EdgeWorker("good", pair[0])])
    out = collect(pool, tasks(4), placement=dict.fromkeys(range(4), "bad"))
    assert sorted(r.index for r in out) == [0, 1, 2, 3]  # each point once
    assert [r.worker for r in out].count("bad") == 1
    [bad, good] = pool.snapshot()
    assert bad.failure_rate > 0 and good.failure_rate == 0
    assert bad.inflight == good.inflight == 0 and bad.models == ("model-x",)


def test_only_failed_edges_left_raises_after_delivering(pair: tuple[Named, Named]) -> None:
    pool = EdgePool([DiesAfterOne("bad", pair[0])])

    async def run() -> tuple[list[int], list[int]]:
        got = []
        with pytest.raises(NoEdgeAvailableError) as exc:
            async for r in pool.dispatch(tasks(3)):
                got.append(r.index)
        return got, sorted(t.index for t in exc.value.tasks)

    got, missing = asyncio.run(run())
    assert len(got) == 1 and sorted(got + missing) == [0, 1, 2]
