"""Garbage sections, on real outputs of the packaged edge models (tests/cloud/data/
real_expansions.json, written by tests/cloud/capture_expansions.py): every kind the issue
reports is detected, repaired or replaced, and never returned; the metric counts it."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from pice.cloud.ensemble import EnsembleConfig, EnsembleStats, PointExpander, Source
from pice.cloud.garbage import drop_said, problem, salvage, same_sentence
from pice.cloud.guard import REASONS, GuardConfig, clean
from pice.cloud.metrics import Metrics
from pice.cloud.selection import body
from pice.cloud.sketcher import parse_sketch
from pice.edge.expander import clean_expansion
from pice.shared.protocol import ExpansionResult, ExpansionTask

DATA = json.loads((Path(__file__).parent / "data" / "real_expansions.json").read_text())
ROWS: list[dict[str, Any]] = DATA["rows"]
REMOTE = ["Set up a dedicated workspace", "Prioritize tasks", "Use productivity tools",
          "Take breaks", "Stay organized"]


def others(row: dict[str, Any]) -> list[str]:
    return [p for i, p in enumerate(row["sketch"]) if i != row["index"]]


def section_body(row: dict[str, Any]) -> str:
    """What the edge worker makes of the raw text (its cleaning), before the guard."""
    return clean_expansion(row["raw"], row["sketch"][row["index"]])


# (row number in the fixture, the kind) — read and labelled by hand
LABELLED = [
    (1, "other point"),  # "1. Establish a consistent sleep schedule. 2. Create …" (qwen)
    (2, "other point"),  # "3. Exercise regularly." for "Avoid caffeine …" (qwen)
    (10, "other point"),  # "1. High foot traffic, 2. Local menu options, 3. …" (qwen)
    (23, "echo"),  # qwen: another point's words inside the section
    (34, "other point"),  # "1. Create a dedicated workspace" for "Stay organized" (qwen)
    (36, "other point"), (37, "other point"),  # "1. Establish a consistent sleep schedule: …"
    (67, "other point"),  # "1. Set up a dedicated workspace: …" for "Use productivity tools"
    (91, "other point"),  # "Stay hydrated." for "Stay alert and prepared" (qwen + adapter)
    (86, "repeats"),  # "… ability to … ability to …" (qwen + adapter)
    (51, "repeats"),  # "which would lead to a decrease in …" x4 (qwen)
    (141, "other point"), (145, "other point"), (171, "other point"),  # gemma: another point
    (149, "echo"), (165, "echo"), (170, "echo"),  # gemma: "1. X: 1. X: 1. X: …"
    (146, "restates"),  # gemma: "Political differences" for "Political instability"
    (175, "repeats"), (180, "repeats"), (188, "repeats"),  # gemma: loops
    (202, "echo"),  # gemma: "…; No maintenance costs; Limited ownership rights"
]


@pytest.mark.parametrize(("row", "kind"), LABELLED)
def test_real_garbage_is_detected_and_never_kept(row: int, kind: str) -> None:
    r = ROWS[row]
    text = section_body(r)
    assert problem(text, r["sketch"][r["index"]], others(r)) == kind, text
    kept = salvage(text, r["sketch"][r["index"]], others(r))
    assert kept is None or problem(kept, r["sketch"][r["index"]], others(r)) is None


def test_the_issue_echo_is_cut_by_the_edge_and_caught_by_the_guard() -> None:
    """The README example's last section (issue 15), as the edge model wrote it."""
    raw = "Prioritize tasks 2. Use productivity tools 3. Take breaks 4. Stay organized"
    assert problem(raw, "Stay organized", REMOTE[:4]) == "echo"
    assert salvage(raw, "Stay organized", REMOTE[:4]) is None
    cut = clean_expansion(raw, "Stay organized")  # the edge now cuts at the item marker
    assert cut == "Prioritize tasks"
    assert problem(cut, "Stay organized", REMOTE[:4]) == "other point"
    # a good sentence before the echo is kept
    mixed = ("Keep your files in named folders so you find things fast. 2. Use productivity "
             "tools 3. Take breaks")
    assert salvage(mixed, "Stay organized", REMOTE[:4]) == (
        "Keep your files in named folders so you find things fast.")


def test_the_sketch_parser_splits_an_echoed_line() -> None:
    assert parse_sketch("1. Prioritize tasks 2. Use productivity tools 3. Take breaks", 6) == [
        "Prioritize tasks", "Use productivity tools", "Take breaks"]


@pytest.mark.parametrize("row", [4, 26, 32, 38, 43, 57, 122])
def test_real_good_sections_pass(row: int) -> None:
    r = ROWS[row]
    assert problem(section_body(r), r["sketch"][r["index"]], others(r)) is None, r["raw"]


def _result(r: dict[str, Any], candidate: int) -> ExpansionResult:
    point = r["sketch"][r["index"]]
    text = f"{point}: {section_body(r)}".rstrip(": ")
    return ExpansionResult(request_id="replay", index=r["index"], candidate=candidate, text=text,
                           worker=f"{r['model']}+{r['adapter']}", model=r["model"],
                           adapter=r["adapter"], tokens=r["tokens"],
                           mean_logprob=r["mean_logprob"], finish_reason=r["finish_reason"],
                           seconds=0.0)


@pytest.mark.parametrize("prompt", ["legacy", "current"])
def test_no_garbage_reaches_an_answer_from_real_candidates(prompt: str) -> None:
    """Each point's three real candidates (qwen, qwen + adapter, gemma) replayed through the
    ensemble with the guard on and no cloud worker: every section that comes out is clean."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in ROWS:
        if r["prompt"] == prompt:
            groups[(r["question"], r["index"])].append(r)
    metrics = Metrics()
    sources = [Source(model=m, adapter=a) for m, a in dict.fromkeys(
        (r["model"], r["adapter"]) for r in ROWS)]
    expander = PointExpander(EnsembleConfig(sources=sources, k=3, guard=GuardConfig()), metrics,
                             None)
    outputs: list[tuple[dict[str, Any], ExpansionResult]] = []
    for (_, _), rows in groups.items():
        first = rows[0]
        task = ExpansionTask(request_id="replay", question=first["question"],
                             sketch=first["sketch"], index=first["index"], max_tokens=64)

        async def dispatch(tasks: list[ExpansionTask], where: Mapping[int, str],
                           rows: list[dict[str, Any]] = rows) -> AsyncIterator[ExpansionResult]:
            for t in tasks:  # the recorded output of the source each candidate asks for
                r = next(x for x in rows if (x["model"], x["adapter"]) == (t.model, t.adapter))
                yield _result(r, t.candidate)

        async def collect(task: ExpansionTask = task) -> list[ExpansionResult]:
            return [p.result async for p in expander.expand_points(
                dispatch, [task], 3, [], EnsembleStats())]

        [final] = asyncio.run(collect())
        outputs.append((first, final))
    for row, final in outputs:
        point = row["sketch"][row["index"]]
        text = body(final, point)
        assert text == "" or problem(text, point, others(row)) is None, (point, final.text)
    counted = Counter({why: metrics.guard_repairs.labels(why)._value.get() for why in REASONS})
    assert sum(counted.values()) > 0  # the guard did repair some of them, and said why


def test_clean_keeps_good_text_and_reports_what_it_removed() -> None:
    r = ROWS[1]
    res = _result(r, 0)
    used, why = clean(res, r["sketch"][r["index"]], others(r))
    assert used is None and why == "other point"
    good = _result(ROWS[4], 0)
    assert clean(good, ROWS[4]["sketch"][ROWS[4]["index"]], others(ROWS[4])) == (good, None)


DUPLICATES = json.loads((Path(__file__).parent / "data" / "real_duplicates.json").read_text())


def test_real_answer_with_a_sentence_in_two_sections() -> None:
    """Captured from a real progressive answer (bench question knowledge-02): points 1 and 2
    both won with "Vaccines are designed to stimulate the immune system to recognize and respond
    to pathogens, such as viruses, bacteria, and other (harmful) organisms." Replayed through the
    ensemble in the order the points came back, with the guard on and no cloud worker: the
    later section loses the sentence another section already said, the metric counts it, and no
    sentence appears in two sections."""
    rows: list[dict[str, Any]] = DUPLICATES["rows"]
    order = list(dict.fromkeys(r["index"] for r in rows))
    sketch = rows[0]["sketch"]
    metrics = Metrics()
    sources = [Source(model=m, adapter=a) for m, a in dict.fromkeys(
        (r["model"], r["adapter"]) for r in rows)]
    expander = PointExpander(EnsembleConfig(sources=sources, k=3, guard=GuardConfig()), metrics,
                             None)
    stats = EnsembleStats()  # one answer: its sections share what has been said

    async def dispatch(tasks: list[ExpansionTask], where: Mapping[int, str]
                       ) -> AsyncIterator[ExpansionResult]:
        for t in tasks:
            r = next(x for x in rows if x["index"] == t.index
                     and (x["model"], x["adapter"]) == (t.model, t.adapter))
            yield ExpansionResult(request_id="replay", index=t.index, candidate=t.candidate,
                                  text=r["text"], worker="edge", model=r["model"],
                                  adapter=r["adapter"], tokens=r["tokens"],
                                  mean_logprob=r["mean_logprob"],
                                  finish_reason=r["finish_reason"], seconds=0.0)

    async def answer() -> dict[int, ExpansionResult]:
        out: dict[int, ExpansionResult] = {}
        for i in order:  # eager dispatch: each point on its own, as its line completed
            task = ExpansionTask(request_id="replay", question=rows[0]["question"],
                                 sketch=sketch, index=i, max_tokens=53)
            async for p in expander.expand_points(dispatch, [task], 3, [], stats):
                out[p.result.index] = p.result
        return out

    sections = asyncio.run(answer())
    assert sorted(sections) == list(range(len(sketch)))
    said: list[str] = []
    for i in order:
        for s in re.split(r"(?<=[.!?])\s+", body(sections[i], sketch[i])):
            assert not any(same_sentence(s, t) for t in said), (i, s)
            said.append(s)
    assert metrics.guard_repairs.labels("duplicate")._value.get() >= 1
    assert any(r["reason"] == "duplicate" for r in stats.repaired)


def test_same_sentence_is_near_exact_only() -> None:
    a = "Helps maintain focus and productivity."
    assert same_sentence(a, "helps maintain focus and productivity")
    assert drop_said(f"{a} Short breaks also rest your eyes.", [f"Plan the day. {a}"]) == (
        "Short breaks also rest your eyes.", 1)
    # sharing a phrase is not saying the same sentence
    assert not same_sentence("Vaccines train the immune system to recognize a pathogen.",
                             "Memory cells let the immune system respond faster next time.")
