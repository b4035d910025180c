"""Ensemble selection: every candidate expansion of a point gets a score from its confidence (the
model's own length-normalized token probability), its agreement with the point's other candidates
and its relevance to the point and the question (sentence-embedding similarities); the best
score wins."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pice.shared.embeddings import Embedder
from pice.shared.protocol import ExpansionResult

MIN_WORDS = 10  # texts shorter than this many words get a proportionally lower score: a
# section should explain its point (two sentences), not restate it in a few words
EXPLAIN_WORDS = 32  # ranking: a candidate under this many words ranks lower (sqrt of the
# share); past it length earns nothing, so padding never wins (and a repeat is garbage anyway).
# About two sentences: a one-sentence section (the adapter's ~25 words) states its point, two
# explain it, and answers made of one-sentence sections read as lists of claims


class SelectionWeights(BaseModel):
    """Weights of the three signals in the combined score (renormalized over those present)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    confidence: float = Field(1.0, ge=0.0)
    agreement: float = Field(1.0, ge=0.0)
    relevance: float = Field(1.0, ge=0.0)


@dataclass(frozen=True)
class CandidateScore:
    candidate: int
    worker: str
    model: str
    adapter: str | None
    confidence: float  # exp(mean token logprob): geometric-mean token probability, in [0, 1]
    agreement: float | None  # mean cosine similarity to the point's other candidates (None: alone)
    relevance: float  # mean cosine similarity to the point title and to the question, less how
    # much closer the text is to another point of the sketch than to its own (off-point text)
    score: float  # weighted mean of the signals present, scaled down for a very short text
    drift: float = 0.0  # how much closer the text is to another sketch point than to its own
    on_question: float = 1.0  # cosine similarity of the text to the question

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def body(result: ExpansionResult, point: str) -> str:
    """The expansion without its "point: " head."""
    text = result.text.strip()
    if point and text.startswith(point):
        text = text[len(point):]
    return text.lstrip(" :.-—").strip()


def score_candidates(question: str, point: str, candidates: list[ExpansionResult],
                     embedder: Embedder, weights: SelectionWeights | None = None,
                     other_points: list[str] | tuple[str, ...] = ()) -> list[CandidateScore]:
    """Scores in the order of `candidates` (one embedding batch for the point). `other_points`:
    the rest of the sketch, so that text about another point loses relevance."""
    w = weights or SelectionWeights()
    bodies = [body(c, point) for c in candidates]
    n_other = len(other_points)
    emb = embedder.encode([point, question, *other_points,
                           *[b or point for b in bodies]])  # [2 + others + k, dim]
    cand = emb[2 + n_other:]  # [k, dim]
    sims = cand @ cand.T  # [k, k]
    own = cand @ emb[0]  # [k]
    on_question = cand @ emb[1]  # [k]
    relevance = (own + on_question) / 2  # [k]
    drift = np.zeros_like(own)  # [k]
    if n_other:
        closest_other = (cand @ emb[2:2 + n_other].T).max(axis=1)  # [k]
        drift = np.maximum(0.0, closest_other - own)
        relevance = relevance - drift
    k = len(candidates)
    scores = []
    for i, (c, text) in enumerate(zip(candidates, bodies, strict=True)):
        confidence = math.exp(min(0.0, c.mean_logprob)) if c.tokens else 0.0
        others = [float(sims[i, j]) for j in range(k) if j != i and bodies[j]]
        agreement = float(np.mean(others)) if others else None
        signals = [(w.confidence, confidence), (w.relevance, float(relevance[i]))]
        if agreement is not None:
            signals.append((w.agreement, agreement))
        total = sum(wt for wt, _ in signals)
        score = sum(wt * s for wt, s in signals) / total if total and text else 0.0
        score *= min(1.0, len(text.split()) / MIN_WORDS)  # a bare phrase explains nothing
        scores.append(CandidateScore(c.candidate, c.worker, c.model, c.adapter, confidence,
                                     agreement, float(relevance[i]), score, float(drift[i]),
                                     float(on_question[i])))
    return scores


def explains(text: str) -> float:
    """How far a section body goes towards explaining its point, in [0, 1]: the square root of
    its share of EXPLAIN_WORDS (one short sentence restating the point ranks below two that
    explain it; beyond EXPLAIN_WORDS, no gain)."""
    return math.sqrt(min(1.0, len(text.split()) / EXPLAIN_WORDS))


def rank_key(score: CandidateScore, text: str) -> float:
    """What the ensemble ranks candidates by: the selection score times `explains`."""
    return score.score * explains(text)


def select(question: str, point: str, candidates: list[ExpansionResult], embedder: Embedder,
           weights: SelectionWeights | None = None,
           other_points: list[str] | tuple[str, ...] = (),
           ) -> tuple[ExpansionResult, list[CandidateScore]]:
    """The winning candidate (the highest `rank_key`; ties: the lower candidate number) and
    every candidate's score."""
    if not candidates:
        raise ValueError("select needs at least one candidate")
    scores = score_candidates(question, point, candidates, embedder, weights, other_points)
    best = max(range(len(candidates)), key=lambda i: (
        rank_key(scores[i], body(candidates[i], point)), -candidates[i].candidate))
    return candidates[best], scores
