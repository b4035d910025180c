"""Per-query decision: full cloud or progressive, and the sketch's shape. Pure code: plain inputs,
plain output, no tensors, no I/O (DESIGN.md §6 rule 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pice.scheduler.suitability import classify

Mode = Literal["auto", "cloud", "progressive"]
MODES: tuple[str, ...] = ("auto", "cloud", "progressive")


@dataclass(frozen=True)
class QueryFeatures:
    question: str  # last user message
    requested_mode: str  # "auto" | "cloud" | "progressive"
    max_tokens: int  # client's cap on the whole answer
    max_points: int | None  # client's cap on sketch points (None → policy default)
    edge_workers: int  # edge workers able to take work now
    prompt_tokens: int = 0  # tokens of the conversation as the cloud model sees it (0: unknown)
    max_context: int = 0  # the models' context limit (0: unknown)


@dataclass(frozen=True)
class PolicyConfig:
    default_max_points: int = 6
    words_per_point: int = 5
    point_tokens: int = 64  # edge tokens per point
    min_answer_tokens: int = 48  # below this a sketch cannot pay for itself
    prompt_overhead_tokens: int = 160  # sketch/expansion instructions around the question

    def __post_init__(self) -> None:
        if not 1 <= self.default_max_points <= 10:
            raise ValueError(
                f"default_max_points must be in [1, 10], got {self.default_max_points}")
        if self.point_tokens < 8:
            raise ValueError(f"point_tokens must be >= 8, got {self.point_tokens}")


@dataclass(frozen=True)
class Decision:
    mode: Literal["cloud", "progressive"]
    reason: str
    max_points: int = 0  # sketch points asked of the cloud model
    words_per_point: int = 0
    sketch_tokens: int = 0  # cloud token budget for the sketch
    point_tokens: int = 0  # edge token budget per point


def decide(q: QueryFeatures, cfg: PolicyConfig) -> Decision:
    """`cloud` and `progressive` are obeyed (progressive needs an edge worker); `auto` goes
    progressive when the question suits a sketch, an edge is up and the answer is long enough."""
    if q.requested_mode not in MODES:
        raise ValueError(f"unknown mode {q.requested_mode!r}; expected one of {MODES}")
    if q.requested_mode == "cloud":
        return Decision("cloud", "requested")
    if q.edge_workers == 0:
        return Decision("cloud", "no edge worker available")
    if q.requested_mode == "auto":
        if q.max_tokens < cfg.min_answer_tokens:
            return Decision("cloud", f"max_tokens {q.max_tokens} too small to sketch")
        suit = classify(q.question)
        if not suit.suits_sketch:
            return Decision("cloud", suit.reason)
    points = min(q.max_points or cfg.default_max_points, 10)
    # Each point's expansion shares the client's budget; the sketch is a few words per point.
    point_tokens = max(8, min(cfg.point_tokens, q.max_tokens // max(points, 1)))
    sketch_tokens = 8 + points * (cfg.words_per_point * 2 + 4)
    # an expansion prompt holds the question, the instructions and the whole sketch
    needed = q.prompt_tokens + cfg.prompt_overhead_tokens + sketch_tokens + point_tokens
    if q.max_context and needed > q.max_context:
        return Decision("cloud", f"prompt too long to sketch ({needed} > {q.max_context} tokens)")
    reason = "requested" if q.requested_mode == "progressive" else "question suits a sketch"
    return Decision("progressive", reason, points, cfg.words_per_point, sketch_tokens, point_tokens)
