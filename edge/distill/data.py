"""Teacher data: the cloud model sketches each training question, then expands every point with
the same prompt an edge worker gets. One JSONL line per question, appended batch by batch, so an
interrupted run picks up where it stopped."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pice.edge.expander import EdgeWorker
from pice.shared.backend import TextGenerator
from pice.shared.protocol import ExpansionTask

log = logging.getLogger(__name__)

# questions → one sketch (list of points, [] when unusable) per question, batched on the teacher
SketchFn = Callable[[list[str]], list[list[str]]]

_SENTENCE_END = (".", "!", "?", '"', "'", ")")


def load_questions(path: Path, limit: int = 0) -> list[dict[str, Any]]:
    """Rows with "id" and "question"; the first `limit` (0 → all)."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not str(row.get("question", "")).strip() or "id" not in row:
            raise ValueError(f"{path}:{n}: each line needs an \"id\" and a non-empty \"question\"")
        rows.append(row)
    return rows[:limit] if limit else rows


def usable(text: str, finish_reason: str) -> bool:
    """A target worth learning: not empty and not cut off mid-sentence."""
    text = text.strip()
    return bool(text) and (finish_reason != "length" or text.endswith(_SENTENCE_END))


def _done_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}


def generate_pairs(questions: list[dict[str, Any]], teacher: TextGenerator, sketch: SketchFn,
                   out: Path, batch_questions: int = 8, point_tokens: int = 48,
                   progress: bool = True) -> int:
    """Append one line per question not yet in `out`: {"id", "question", "sketch",
    "expansions"} where expansions[i] is the teacher's text for point i after its "point: "
    prefix, or null when it came back empty or cut off. Returns the lines written now."""
    done = _done_ids(out)
    todo = [q for q in questions if str(q["id"]) not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    worker = EdgeWorker("teacher", teacher)
    written = 0
    bar = tqdm(total=len(todo), desc="teacher data", unit="question", disable=not progress)
    for start in range(0, len(todo), batch_questions):
        batch = todo[start:start + batch_questions]
        sketches = sketch([str(q["question"]) for q in batch])
        tasks = [ExpansionTask(request_id=str(q["id"]), question=str(q["question"]), sketch=s,
                               index=i, max_tokens=point_tokens)
                 for q, s in zip(batch, sketches, strict=True) for i in range(len(s))]
        results = {(r.request_id, r.index): r for r in worker.expand(tasks)}  # one batch
        with out.open("a") as f:
            for q, s in zip(batch, sketches, strict=True):
                expansions: list[str | None] = []
                for i, point in enumerate(s):
                    r = results[(str(q["id"]), i)]
                    body = r.text[len(point):].lstrip(" :") if r.text.startswith(point) else r.text
                    expansions.append(body if usable(body, r.finish_reason) else None)
                f.write(json.dumps({"id": str(q["id"]), "question": q["question"], "sketch": s,
                                    "expansions": expansions}) + "\n")
                written += 1
        bar.update(len(batch))
    bar.close()
    return written


def read_pairs(path: Path) -> list[tuple[ExpansionTask, str]]:
    """(expansion task, teacher text) for every usable point in a teacher data file."""
    pairs = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for i, text in enumerate(row["expansions"]):
            if text:
                task = ExpansionTask(request_id=row["id"], question=row["question"],
                                     sketch=row["sketch"], index=i, max_tokens=1)
                pairs.append((task, text))
    return pairs
