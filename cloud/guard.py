"""Quality guard: a point whose best candidate is garbage (echoes the sketch, writes another
point, repeats itself, restates its title, says a sentence another section already said:
garbage.py; or drifts off its point), empty, cut off
(hit its token budget without ending a sentence) or scores under the threshold is expanded once
more on the edges (sampled), then, if still wrong, re-expanded by the cloud model (a low score
only when `cloud_for_low_score`; otherwise its clean edge text stands); whatever comes back is
cleaned the same way and finished at a sentence end, so no answer carries a garbage, empty or
cut-off section (the point's title stands in last)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from pice.cloud.garbage import MIN_SECTION_WORDS, drop_said, problem, salvage, words
from pice.cloud.selection import CandidateScore, body
from pice.shared.protocol import ExpansionResult

_SENTENCE_END = re.compile(r"""[.!?…](?:["')\]]*)\s*$""")
_LAST_SENTENCE_END = re.compile(r"""^(.*[.!?…]["')\]]*)(?:\s|$)""", re.S)


# why a point was repaired (the `reason` label of pice_guard_repairs_total)
REASONS = ("echo", "other point", "repeats", "restates", "duplicate", "off point", "empty",
           "cut off", "low score")


class GuardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True  # False: sections pass through untouched (scores still computed)
    threshold: float = Field(0.4, ge=0.0, le=1.0)  # combined selection score below → repair
    repair_token_factor: float = Field(1.0, ge=1.0, le=8.0)  # cloud budget vs the edge's
    # a clean section under `threshold` that no edge retry beat: rewritten by the cloud
    # (True) or kept (False: a cloud pass costs 10-25 s of a 2-core machine)
    cloud_for_low_score: bool = False
    # off point: the text is this much closer (MiniLM cosine) to another point than to its own,
    # and either far from the question (under `on_question`) or closer to the other point by
    # `hard_drift` or more (see `off_point`)
    max_drift: float = Field(0.1, ge=0.0, le=2.0)
    on_question: float = Field(0.4, ge=-1.0, le=1.0)
    hard_drift: float = Field(0.25, ge=0.0, le=2.0)


def off_point(score: CandidateScore, cfg: GuardConfig) -> bool:
    """The text is about another point of the sketch, not its own. Closer to another point by
    `max_drift` is not enough when the points overlap and the text is on the question: of the 37
    clean sections of tests/cloud/data/real_expansions.json past max_drift, the ones on the
    question (cosine >= 0.4: refrigerator insulation under "Insulation", a restaurant's
    atmosphere under "Unique ambiance") explain their own point in words close to a neighbour's,
    while the text copied from the worked example ("Get up at a fixed time" under "Use
    productivity tools") or from another point ("Create a dedicated workspace" under "Stay
    organized") is far from the question or far closer to the other point. "Off point" was the
    reason of 5 of the 8 cloud repairs in 16 bench answers (2026-12-02), each 10-25 s."""
    if score.drift <= cfg.max_drift:
        return False
    return score.on_question < cfg.on_question or score.drift >= cfg.hard_drift


def cut_off(result: ExpansionResult, point: str) -> bool:
    """Stopped by the token budget in the middle of a sentence."""
    return result.finish_reason == "length" and not _SENTENCE_END.search(body(result, point))


def _salvageable(text: str, min_words: int = 6) -> bool:
    """A cut-off text whose complete sentences alone make a section (at least `min_words`)."""
    m = _LAST_SENTENCE_END.match(text)
    return m is not None and len(m.group(1).split()) >= min_words


def verdict(result: ExpansionResult, point: str, score: float | None,
            cfg: GuardConfig) -> str | None:
    """Why this point must be repaired ("empty", "cut off" with no full sentence to keep,
    "low score"), or None (whether or not the guard is enabled). A cut-off text with complete
    sentences is not repaired: `finish` drops its tail, which costs no cloud pass."""
    if not body(result, point):
        return "empty"
    if cut_off(result, point) and not _salvageable(body(result, point)):
        return "cut off"  # nothing worth keeping before the cut (a salvageable one is trimmed)
    if score is not None and score < cfg.threshold:
        return "low score"
    return None


def clean(result: ExpansionResult, point: str, others: list[str], said: Sequence[str] = ()
          ) -> tuple[ExpansionResult | None, str | None]:
    """(the result to use, what was wrong): unchanged and None when it is fine; its good part
    and the problem when one could be kept; None and the problem when nothing could. `said`:
    the bodies of the answer's sections decided before this one: a sentence one of them already
    says is dropped ("duplicate"), and the section goes when too little is left."""
    text = body(result, point)
    why = problem(text, point, others)
    kept = text if why is None else salvage(text, point, others)
    if kept and said:
        rest, dropped = drop_said(kept, said)
        if dropped:
            why = why or "duplicate"
            kept = rest if (len(words(rest)) >= MIN_SECTION_WORDS
                            and problem(rest, point, others) is None) else None
    if why is None:
        return result, None
    if kept is None:
        return None, why
    # a salvaged text ends at a full sentence; one that only lost a said sentence keeps its
    # finish reason (a cut-off tail is still finished later)
    done = {} if why == "duplicate" else {"finish_reason": "stop"}
    return result.model_copy(update={"text": f"{point}: {kept}", **done}), why


def finish(result: ExpansionResult, point: str) -> ExpansionResult:
    """The result with a cut-off tail dropped back to its last full sentence (a cut-off text
    without any sentence end gets a closing period); never empty: the point title stands in."""
    text = body(result, point)
    if text and cut_off(result, point):
        m = _LAST_SENTENCE_END.match(text)
        text = m.group(1) if m else text.rstrip(" ,;:-—") + "."
    if not text:
        text = f"{point}."
        return result.model_copy(update={"text": text})
    return result.model_copy(update={"text": f"{point}: {text}" if point else text})
