"""Candidate scoring with the packaged MiniLM: confidence, agreement, relevance, the winner."""

from __future__ import annotations

import math

import pytest

from pice.cloud.selection import SelectionWeights, body, score_candidates, select
from pice.shared.embeddings import get_embedder
from pice.shared.protocol import ExpansionResult

QUESTION = "How can I sleep better at night?"
POINT = "Dark quiet bedroom"


def cand(candidate: int, text: str, logprob: float = -0.5, tokens: int = 12,
         model: str = "m") -> ExpansionResult:
    return ExpansionResult(request_id="r", index=0, candidate=candidate, text=f"{POINT}: {text}",
                           worker=f"w{candidate}", model=model, tokens=tokens,
                           mean_logprob=logprob, finish_reason="stop", seconds=0.1)


ON_TOPIC = "Keep the bedroom dark and quiet with blackout curtains so you fall asleep faster."
ALSO_ON = "A quiet, dark room with heavy curtains helps your body sleep through the night."
OFF_TOPIC = "The stock market rose sharply after the central bank cut interest rates."


def test_relevant_agreeing_candidate_beats_an_off_topic_one() -> None:
    cands = [cand(0, OFF_TOPIC), cand(1, ON_TOPIC), cand(2, ALSO_ON)]
    winner, scores = select(QUESTION, POINT, cands, get_embedder())
    assert winner.candidate in (1, 2)
    off, on, also = scores
    assert off.relevance < min(on.relevance, also.relevance)
    assert off.agreement is not None and on.agreement is not None
    assert off.agreement < on.agreement  # the two on-topic texts agree with each other
    assert off.score < min(on.score, also.score)


def test_confidence_is_the_geometric_mean_token_probability() -> None:
    sure, unsure = cand(0, ON_TOPIC, logprob=-0.1), cand(1, ON_TOPIC, logprob=-2.0)
    a, b = score_candidates(QUESTION, POINT, [sure, unsure], get_embedder())
    assert a.confidence == pytest.approx(math.exp(-0.1))
    assert b.confidence == pytest.approx(math.exp(-2.0))
    assert a.relevance == pytest.approx(b.relevance, abs=1e-5)  # same text
    assert a.score > b.score


def test_alone_has_no_agreement_and_empty_scores_zero() -> None:
    [alone] = score_candidates(QUESTION, POINT, [cand(0, ON_TOPIC)], get_embedder())
    assert alone.agreement is None and 0 < alone.score <= 1
    empty, full = score_candidates(QUESTION, POINT, [cand(0, ""), cand(1, ON_TOPIC)],
                                   get_embedder())
    assert empty.score == 0.0 and full.agreement is None  # an empty text agrees with nothing
    assert body(cand(0, ""), POINT) == ""


def test_weights_select_the_signal() -> None:
    # relevance only: the on-topic text wins even with far lower confidence
    cands = [cand(0, OFF_TOPIC, logprob=-0.05), cand(1, ON_TOPIC, logprob=-3.0)]
    only_rel = SelectionWeights(confidence=0, agreement=0, relevance=1)
    assert select(QUESTION, POINT, cands, get_embedder(), only_rel)[0].candidate == 1
    only_conf = SelectionWeights(confidence=1, agreement=0, relevance=0)
    assert select(QUESTION, POINT, cands, get_embedder(), only_conf)[0].candidate == 0


def test_ties_go_to_the_lower_candidate_and_no_candidates_is_refused() -> None:
    winner, _ = select(QUESTION, POINT, [cand(1, ON_TOPIC), cand(0, ON_TOPIC)], get_embedder())
    assert winner.candidate == 0
    with pytest.raises(ValueError, match="at least one candidate"):
        select(QUESTION, POINT, [], get_embedder())


def test_text_about_another_point_or_a_bare_phrase_loses() -> None:
    sketch = ["Fixed sleep schedule", POINT, "No screens late"]
    others = [p for p in sketch if p != POINT]
    copied = cand(0, "Fixed sleep schedule", logprob=-0.1)  # another point, restated
    good = cand(1, ON_TOPIC, logprob=-0.8)
    winner, (c, _) = select(QUESTION, POINT, [copied, good], get_embedder(),
                            other_points=others)
    assert winner.candidate == 1
    alone = score_candidates(QUESTION, POINT, [copied], get_embedder())[0]
    assert c.relevance < alone.relevance  # knowing the other points is what exposes it
    short, full = score_candidates(QUESTION, POINT, [cand(0, "Dark room."), cand(1, ON_TOPIC)],
                                   get_embedder())
    assert short.score < full.score and short.confidence == full.confidence
