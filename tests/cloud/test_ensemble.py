"""Ensemble expansion in a real pipeline: k candidates per point on different edge models, all
points of one model as one batch, the best-scoring candidate wins, scores ride on the section."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import pytest

from pice.cloud.edge_pool import EdgePool
from pice.cloud.ensemble import EnsembleConfig, PinnedEnsemble, Source, ensemble_tasks
from pice.cloud.events import DoneEvent, Event, SectionEvent
from pice.cloud.guard import GuardConfig
from pice.cloud.metrics import Metrics
from pice.cloud.pipeline import AnswerRequest, Pipeline
from pice.edge.expander import EdgeWorker
from pice.scheduler.policy import PolicyConfig
from pice.scheduler.service import Scheduler
from pice.shared.hf_backend import HFGenerator
from pice.shared.protocol import ExpansionTask
from pice.shared.sampling import Completion, SamplingParams
from tests.conftest import SKETCH_QUESTIONS
from tests.factories import tiny_qwen2


class CountingGenerator(HFGenerator):
    """The real tiny model, recording the size of every batch it runs."""

    def __init__(self, path: str) -> None:
        super().__init__(path, max_context=1024)
        self.batches: list[int] = []

    def generate(self, prompts: list[str], params: SamplingParams,
                 adapters: object = None) -> list[Completion]:
        self.batches.append(len(prompts))
        return super().generate(prompts, params)


@pytest.fixture(scope="module")
def second_edge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen2(tmp_path_factory.mktemp("tiny-edge-b"), seed=1)


def run(pipeline: Pipeline, k: int) -> list[Event]:
    pipeline.scheduler = cast(Scheduler, PinnedEnsemble(pipeline.scheduler, k))
    req = AnswerRequest("r1", [{"role": "user", "content": SKETCH_QUESTIONS[0]}], max_tokens=60,
                        mode="progressive")

    async def collect() -> list[Event]:
        return [ev async for ev in pipeline.run(req)]

    return asyncio.run(collect())


def test_each_point_gets_one_candidate_per_model_and_the_best_wins(
        sketch_model_dir: Path, tiny_model_dir: Path, second_edge_dir: Path) -> None:
    cloud = HFGenerator(str(sketch_model_dir), max_context=1024)
    a, b = CountingGenerator(str(tiny_model_dir)), CountingGenerator(str(second_edge_dir))
    cfg = EnsembleConfig(sources=[Source(model=a.name), Source(model=b.name)],
                         guard=GuardConfig(enabled=False))
    metrics = Metrics()
    pipeline = Pipeline(cloud, EdgePool([EdgeWorker("ea", a), EdgeWorker("eb", b)]),
                        PolicyConfig(), metrics, ensemble=cfg, eager=False)  # one dispatch
    events = run(pipeline, k=3)  # more than there are sources: capped at 2
    sections = [e for e in events if isinstance(e, SectionEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.mode == "progressive" and done.ensemble == 2
    assert sorted(s.index for s in sections) == [0, 1, 2]
    assert a.batches == [3] and b.batches == [3]  # every point of a model in one batch
    for s in sections:
        assert {c["worker"] for c in s.candidates} == {"ea", "eb"}
        assert {c["model"] for c in s.candidates} == {a.name, b.name}
        best = max(s.candidates, key=lambda c: (c["score"], -c["candidate"]))
        assert (s.candidate, s.worker, s.model) == (best["candidate"], best["worker"],
                                                     best["model"])
        assert s.score == best["score"]
        assert all(c["agreement"] is not None for c in s.candidates if c["score"] > 0)
    wins = sum(metrics.ensemble_wins.labels(m, "")._value.get() for m in (a.name, b.name))
    assert wins == 3
    assert [s.index for s in done.sections] == [0, 1, 2]
    assert done.sections[0].candidates  # the done event keeps the scores too


def test_k_one_runs_the_first_source_only(sketch_model_dir: Path, tiny_model_dir: Path,
                                          second_edge_dir: Path) -> None:
    cloud = HFGenerator(str(sketch_model_dir), max_context=1024)
    a, b = CountingGenerator(str(tiny_model_dir)), CountingGenerator(str(second_edge_dir))
    cfg = EnsembleConfig(sources=[Source(model=b.name), Source(model=a.name)],
                         guard=GuardConfig(enabled=False))
    pipeline = Pipeline(cloud, EdgePool([EdgeWorker("ea", a), EdgeWorker("eb", b)]),
                        PolicyConfig(), Metrics(), ensemble=cfg, eager=False)
    events = run(pipeline, k=1)
    sections = [e for e in events if isinstance(e, SectionEvent)]
    assert a.batches == [] and b.batches == [3]
    assert all(s.worker == "eb" and len(s.candidates) == 1 for s in sections)
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.ensemble == 1


def test_tasks_pinned_by_the_client_run_alone() -> None:
    t = ExpansionTask(request_id="r", question="q", sketch=["a", "b"], index=0, max_tokens=8)
    sources = [Source(model="m1", adapter="x"), Source(model="m2")]
    out = ensemble_tasks([t, t.model_copy(update={"index": 1})], 2, sources)
    assert [(x.index, x.candidate, x.model, x.adapter) for x in out] == [
        (0, 0, "m1", "x"), (0, 1, "m2", None), (1, 0, "m1", "x"), (1, 1, "m2", None)]
    pinned = t.model_copy(update={"adapter": "tenant-a"})
    assert ensemble_tasks([pinned], 2, sources) == [pinned]


def test_ensemble_runs_on_an_idle_server_without_pinning(
        sketch_model_dir: Path, tiny_model_dir: Path, second_edge_dir: Path) -> None:
    """Issue 15: every section had one candidate even on an idle server. With the real
    scheduler (no PinnedEnsemble) and an explicit progressive request, each point gets one
    candidate per source, eager dispatch included."""
    cloud = HFGenerator(str(sketch_model_dir), max_context=1024)
    a, b = CountingGenerator(str(tiny_model_dir)), CountingGenerator(str(second_edge_dir))
    cfg = EnsembleConfig(sources=[Source(model=a.name), Source(model=b.name)],
                         guard=GuardConfig(enabled=False))
    pipeline = Pipeline(cloud, EdgePool([EdgeWorker("ea", a), EdgeWorker("eb", b)]),
                        PolicyConfig(), Metrics(), ensemble=cfg, eager=True)
    req = AnswerRequest("r1", [{"role": "user", "content": SKETCH_QUESTIONS[0]}], max_tokens=60,
                        mode="progressive")

    async def collect() -> list[Event]:
        return [ev async for ev in pipeline.run(req)]

    events = asyncio.run(collect())
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.ensemble == 2
    assert all(len(s.candidates) == 2 for s in done.sections)
    assert sum(a.batches) == sum(b.batches) == 3


def shared_cpu_pipeline(sketch_model_dir: Path, tiny_model_dir: Path, second_edge_dir: Path,
                        shared_cpu_ensemble: int
                        ) -> tuple[Pipeline, CountingGenerator, CountingGenerator]:
    """Two tiny edge models in this process (so they share the cloud's cores), one ensemble
    source each, guard off."""
    cloud = HFGenerator(str(sketch_model_dir), max_context=1024)
    a, b = CountingGenerator(str(tiny_model_dir)), CountingGenerator(str(second_edge_dir))
    cfg = EnsembleConfig(sources=[Source(model=a.name), Source(model=b.name)],
                         guard=GuardConfig(enabled=False))
    pipeline = Pipeline(cloud, EdgePool([EdgeWorker("ea", a), EdgeWorker("eb", b)]),
                        PolicyConfig(), Metrics(), ensemble=cfg,
                        shared_cpu_ensemble=shared_cpu_ensemble)
    return pipeline, a, b


def test_edges_on_the_cloud_cores_get_a_smaller_ensemble_after_the_sketch(
        sketch_model_dir: Path, tiny_model_dir: Path, second_edge_dir: Path) -> None:
    """Every edge in this process: by default (eager=None) the points go out in one dispatch
    once the sketch is done (eager expansions would take the sketch's cores), and an idle
    server's ensemble is capped at shared_cpu_ensemble candidates per point."""
    pipeline, a, b = shared_cpu_pipeline(sketch_model_dir, tiny_model_dir, second_edge_dir,
                                         1)
    assert pipeline.edges_share_cpu() and not pipeline.eager_now()
    req = AnswerRequest("r1", [{"role": "user", "content": SKETCH_QUESTIONS[0]}], max_tokens=60,
                        mode="progressive")

    async def collect() -> list[Event]:
        return [ev async for ev in pipeline.run(req)]

    done = asyncio.run(collect())[-1]
    assert isinstance(done, DoneEvent) and done.ensemble == 1
    assert all(len(s.candidates) == 1 for s in done.sections)
    assert a.batches == [3] and b.batches == []  # one batch of every point, first source only
    pipeline.eager = True  # asked for: eager all the same
    assert pipeline.eager_now()


def test_shared_cpu_ensemble_only_while_no_other_request_runs(
        sketch_model_dir: Path, tiny_model_dir: Path, second_edge_dir: Path) -> None:
    """Edges on the cloud's cores have room for a second candidate only while nothing else
    runs: a request planned while another is being answered gets one candidate per point, and
    the next one on the idle server gets the ensemble again."""
    pipeline, _, _ = shared_cpu_pipeline(sketch_model_dir, tiny_model_dir, second_edge_dir,
                                         2)

    def req(rid: str) -> AnswerRequest:
        return AnswerRequest(rid, [{"role": "user", "content": SKETCH_QUESTIONS[0]}],
                             max_tokens=60, mode="progressive")

    async def scenario() -> tuple[list[int], list[Event]]:
        first = await pipeline.plan(req("r1"))
        events = pipeline.execute(first)
        got = [await events.__anext__()]  # r1 is being answered
        during = await pipeline.plan(req("r2"))
        got += [ev async for ev in events]
        after = await pipeline.plan(req("r3"))
        assert first.decision and during.decision and after.decision
        return [first.decision.ensemble, during.decision.ensemble,
                after.decision.ensemble], got

    ks, events = asyncio.run(scenario())
    assert ks == [2, 1, 2]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.ensemble == 2
    assert pipeline.busy == 0
