"""Quality guard: its verdicts, and repairs by the cloud model inside a real pipeline."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pice.cloud.edge_pool import EdgePool
from pice.cloud.ensemble import EnsembleConfig
from pice.cloud.events import DoneEvent, Event, SectionEvent
from pice.cloud.guard import REASONS, GuardConfig, cut_off, finish, verdict
from pice.cloud.metrics import Metrics
from pice.cloud.pipeline import AnswerRequest, Pipeline
from pice.edge.expander import EdgeWorker
from pice.scheduler.policy import PolicyConfig
from pice.shared.hf_backend import HFGenerator
from pice.shared.protocol import ExpansionResult
from pice.shared.worker import CLOUD_WORKER_ID
from tests.conftest import SKETCH_QUESTIONS

POINT = "Dark room"
CFG = GuardConfig(threshold=0.4)


def result(text: str, finish_reason: str = "stop") -> ExpansionResult:
    return ExpansionResult(request_id="r", index=0, text=f"{POINT}: {text}".rstrip(": "),
                           worker="e0", model="m", tokens=9, mean_logprob=-1.0,
                           finish_reason=finish_reason, seconds=0.1)


def test_verdicts() -> None:
    assert verdict(result(""), POINT, 0.9, CFG) == "empty"
    assert verdict(result("Close the curtains and", "length"), POINT, 0.9, CFG) == "cut off"
    assert verdict(result("Close the curtains.", "length"), POINT, 0.9, CFG) is None
    # a cut-off text with a full sentence worth keeping is trimmed, not sent to the cloud
    kept = "Close the curtains an hour before bed. Then turn off the"
    assert verdict(result(kept, "length"), POINT, 0.9, CFG) is None
    assert verdict(result("Close them. Then turn off the", "length"), POINT, 0.9, CFG) == "cut off"
    assert verdict(result("Close the curtains"), POINT, 0.9, CFG) is None  # ended naturally
    assert verdict(result("Close the curtains."), POINT, 0.39, CFG) == "low score"
    assert verdict(result("Close the curtains."), POINT, None, CFG) is None


def test_finish_never_leaves_a_cut_off_or_empty_section() -> None:
    trimmed = finish(result("Close the curtains. Then turn off the", "length"), POINT)
    assert trimmed.text == f"{POINT}: Close the curtains."
    closed = finish(result("Close the curtains and", "length"), POINT)
    assert closed.text == f"{POINT}: Close the curtains and." and not cut_off(closed, POINT)
    assert finish(result(""), POINT).text == f"{POINT}."


def run(pipeline: Pipeline, question: str) -> list[Event]:
    req = AnswerRequest("r1", [{"role": "user", "content": question}], max_tokens=60,
                        mode="progressive")

    async def collect() -> list[Event]:
        return [ev async for ev in pipeline.run(req)]

    return asyncio.run(collect())


@pytest.fixture(scope="module")
def models(sketch_model_dir: Path, tiny_model_dir: Path) -> tuple[HFGenerator, HFGenerator]:
    """The cloud (trained to sketch) and a random edge model whose expansions are junk."""
    return (HFGenerator(str(sketch_model_dir), max_context=1024),
            HFGenerator(str(tiny_model_dir), max_context=1024))


def pipeline(models: tuple[HFGenerator, HFGenerator], guard: GuardConfig,
             cloud_worker: bool = True) -> tuple[Pipeline, Metrics]:
    cloud, edge = models
    metrics = Metrics()
    return Pipeline(cloud, EdgePool([EdgeWorker("e0", edge)]), PolicyConfig(), metrics,
                    cloud_worker=EdgeWorker(CLOUD_WORKER_ID, cloud) if cloud_worker else None,
                    ensemble=EnsembleConfig(k=1, guard=guard)), metrics


def test_points_under_the_threshold_are_rewritten_by_the_cloud(models) -> None:  # type: ignore[no-untyped-def]
    # nothing an edge writes passes, and the guard is told to spend cloud passes on low scores
    p, metrics = pipeline(models, GuardConfig(threshold=1.0, cloud_for_low_score=True))
    events = run(p, SKETCH_QUESTIONS[0])
    sections = [e for e in events if isinstance(e, SectionEvent)]
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.mode == "progressive"
    assert sorted(s.index for s in sections) == [0, 1, 2]
    assert all(s.repaired for s in sections)
    assert all(s.candidates and s.candidates[0]["worker"] == "e0" for s in sections)
    assert sorted(r["index"] for r in done.repaired) == [0, 1, 2]
    # the cloud's rewrite; when the (random) cloud wrote nothing usable, the edge's own clean
    # pick; the bare title only when neither is usable
    by = {r["index"]: r["by"] for r in done.repaired}
    for s in sections:
        assert (s.worker == CLOUD_WORKER_ID) == (by[s.index] == CLOUD_WORKER_ID)
        assert by[s.index] in (CLOUD_WORKER_ID, "kept", "title")
        assert (by[s.index] == "title") == (": " not in s.text)
    counted = sum(metrics.guard_repairs.labels(why)._value.get() for why in REASONS)
    assert counted == 3
    for s in sections:  # never empty; cut off (used its whole budget) only at a sentence end
        text = s.text.split(": ", 1)[1] if ": " in s.text else ""
        # the random cloud's text when it is not garbage, else the point's title alone
        assert text.strip() or (s.text.endswith(".") and len(s.text) > 1)
        assert s.tokens < 2 * (60 // 3) or text.rstrip()[-1] in ".!?…\"')]"
    assert done.tokens["edge"] > 0  # the edge's work is counted though it lost


def test_low_scores_keep_their_edge_text_by_default(models) -> None:  # type: ignore[no-untyped-def]
    """A clean section under the threshold is retried on the edges (sampled) and otherwise
    keeps its edge text: no cloud pass (those go to garbage, empty and cut-off sections)."""
    p, _ = pipeline(models, GuardConfig(threshold=1.0))
    events = run(p, SKETCH_QUESTIONS[0])
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.mode == "progressive"
    low = [r for r in done.repaired if r["reason"] == "low score"]
    assert all(r["by"] == "kept" for r in low)
    assert all(s.worker != CLOUD_WORKER_ID for s in done.sections
               if s.index in {r["index"] for r in low})


def test_disabled_guard_passes_edge_sections_through(models) -> None:  # type: ignore[no-untyped-def]
    p, _ = pipeline(models, GuardConfig(enabled=False, threshold=1.0))
    events = run(p, SKETCH_QUESTIONS[0])
    sections = [e for e in events if isinstance(e, SectionEvent)]
    assert len(sections) == 3
    assert all(s.worker == "e0" and s.repaired is None and s.score is not None
               for s in sections)
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.repaired == []


def test_without_a_cloud_worker_low_scores_stand_and_cut_offs_are_finished(models) -> None:  # type: ignore[no-untyped-def]
    p, _ = pipeline(models, GuardConfig(threshold=1.0), cloud_worker=False)
    events = run(p, SKETCH_QUESTIONS[0])
    sections = [e for e in events if isinstance(e, SectionEvent)]
    assert len(sections) == 3 and all(s.worker == "e0" for s in sections)
    done = events[-1]
    assert isinstance(done, DoneEvent)
    # junk from a random model: cut-offs finished, garbage trimmed or reduced to its title
    assert all(r["reason"] in REASONS and r["reason"] != "low score"
               and r["by"] in ("e0", "trim", "title") for r in done.repaired)
    for s in sections:
        assert s.text.rstrip()[-1] in ".!?…\"')]" or s.index not in [
            r["index"] for r in done.repaired]


def test_sections_over_sse_carry_scores_and_source(server) -> None:  # type: ignore[no-untyped-def]
    """The live server (guard off there) streams each section with its candidates' scores and
    the winner's source; the JSON response carries the same fields."""
    import json

    import httpx

    body = {"question": SKETCH_QUESTIONS[0], "max_tokens": 60}
    with httpx.stream("POST", f"{server.url}/v1/progressive", json=body, timeout=120) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data:")]
    events = [json.loads(line[5:]) for line in lines]
    sections = [e for e in events if "candidates" in e]
    assert len(sections) == 3
    for s in sections:
        assert s["model"] and s["score"] is not None and s["repaired"] is None
        [c] = s["candidates"]  # one edge model: one candidate
        assert c["worker"] == s["worker"] == "edge-0" and c["score"] == s["score"]
        assert {"confidence", "agreement", "relevance", "adapter"} <= set(c)
    done = events[-1]
    assert done["ensemble"] == 1 and done["repaired"] == []
    plain = httpx.post(f"{server.url}/v1/progressive", json={**body, "stream": False},
                       timeout=120).json()
    assert plain["ensemble"] == 1 and all(s["candidates"] for s in plain["sections"])


ECHO_SKETCH = ["Set up a dedicated workspace", "Prioritize tasks", "Use productivity tools",
               "Take breaks", "Stay organized"]
ECHO = "Stay organized: Prioritize tasks 2. Use productivity tools 3. Take breaks 4. Stay organized"
CLEAN = ("Stay organized: Keep your desk, files and calendar in order so that you spend less "
         "time searching for things. A tidy space also makes it easier to focus on one task at "
         "a time while working from home.")


@pytest.mark.parametrize("retry_text", [CLEAN, ECHO])
def test_garbage_is_retried_on_the_next_edge_source_before_the_cloud(retry_text: str) -> None:
    """One candidate per point (source 0) echoes the sketch, the README's own garbage section:
    the point is expanded once more on the edges, by source 0 sampled and by source 1. A
    clean retry stands (no cloud pass, counted with the retry's worker); a retry that is
    garbage too leaves the point to the next step (here no cloud worker: its title)."""
    from collections.abc import AsyncIterator, Mapping

    from pice.cloud.ensemble import EnsembleStats, PointExpander, Source
    from pice.shared.protocol import ExpansionTask

    metrics = Metrics()
    sources = [Source(model="m0", adapter="expander"), Source(model="m1")]
    expander = PointExpander(EnsembleConfig(sources=sources, k=1, guard=GuardConfig()), metrics,
                             None)
    task = ExpansionTask(request_id="r", question="How can I stay focused working from home?",
                         sketch=ECHO_SKETCH, index=4, max_tokens=64)
    asked: list[tuple[str | None, str | None, int]] = []

    async def dispatch(tasks: list[ExpansionTask], where: Mapping[int, str]
                       ) -> AsyncIterator[ExpansionResult]:
        for t in tasks:
            asked.append((t.model, t.adapter, t.candidate))
            text = ECHO if t.model == "m0" else retry_text
            yield ExpansionResult(request_id="r", index=t.index, candidate=t.candidate,
                                  text=text, worker=f"edge-{t.model}", model=t.model or "",
                                  adapter=t.adapter, tokens=30, mean_logprob=-0.3,
                                  finish_reason="stop", seconds=0.1)

    stats = EnsembleStats()

    async def collect() -> list[ExpansionResult]:
        return [p.result async for p in expander.expand_points(dispatch, [task], 1, [], stats)]

    [final] = asyncio.run(collect())
    # the retries, one batch: the source that ran, sampled, and the next unused source
    assert asked == [("m0", "expander", 0), ("m0", "expander", 1), ("m1", None, 2)]
    assert stats.edge_tokens == 90 and len(stats.repaired) == 1
    assert stats.repaired[0]["reason"] == "echo"
    assert metrics.guard_repairs.labels("echo")._value.get() == 1
    if retry_text == CLEAN:
        assert final.text == CLEAN and final.worker == "edge-m1"
        assert stats.repaired[0]["by"] == "edge-m1"
    else:
        assert final.text == "Stay organized." and stats.repaired[0]["by"] == "title"


@pytest.mark.parametrize(("row", "off"), [
    (207, True),  # "Get up at a fixed time" (the worked example) under "Use productivity tools"
    (205, True),  # the same under "Set up a dedicated workspace"
    (69, True),  # "Create a dedicated workspace …" under "Stay organized": another point's
    (22, False),  # "Refrigerators use insulation to keep food cold …" under "Insulation"
    (11, False),  # "Restaurants often have a welcoming atmosphere …" under "Unique ambiance"
])
def test_off_point_on_real_sections(row: int, off: bool) -> None:
    """Real expansions (qwen 0.5B, tests/cloud/data/real_expansions.json) past max_drift: the two
    on the question explain their own point in words near a neighbour's and stand; the copied
    example and the other point's text are off point."""
    import json

    from pice.cloud.guard import off_point
    from pice.cloud.selection import score_candidates
    from pice.edge.expander import clean_expansion
    from pice.shared.embeddings import get_embedder

    data = json.loads((Path(__file__).parent / "data" / "real_expansions.json").read_text())
    r = data["rows"][row]
    point = r["sketch"][r["index"]]
    res = result(clean_expansion(r["raw"], point)).model_copy(
        update={"text": f"{point}: {clean_expansion(r['raw'], point)}"})
    others = [p for i, p in enumerate(r["sketch"]) if i != r["index"]]
    [score] = score_candidates(r["question"], point, [res], get_embedder(), None, others)
    assert score.drift > CFG.max_drift  # every one of them leans toward another point
    assert off_point(score, CFG) is off
    assert off_point(score, CFG.model_copy(update={"on_question": -1.0,
                                                   "hard_drift": 2.0})) is False
