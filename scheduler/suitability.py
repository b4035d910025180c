"""Does a question suit a sketch? Skeleton-of-Thought's finding: answers that are a list of
independent points (advice, explanations, comparisons, counterfactuals) gain; math, code, fermi
estimates and creative writing need sequential reasoning or one voice and lose quality.

This first router is a documented keyword rule over the question text (no model, no I/O). It
errs toward `cloud`: a wrong `cloud` costs speed, a wrong `progressive` costs quality."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Patterns of the categories that do not suit a sketch, checked in this order.
_UNSUITED: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("code", re.compile(
        r"\b(write|implement|code|debug|fix)\b.*\b(function|class|program|script|code|method|"
        r"query|regex|algorithm)\b|\b(in|using)\s+(python|javascript|typescript|java|c\+\+|rust|"
        r"go|sql|bash)\b|```", re.I | re.S)),
    ("math", re.compile(
        r"\d+\s*[-+*/×÷^=]\s*\d+|\b(solve|calculate|compute|how much|how many \w+ (?:does|did|will)"
        r"|what is \d|percent|equation|integral|derivative|probability|how old|perimeter|"
        r"final price|average speed)\b|\d\s*%", re.I)),
    ("fermi", re.compile(r"\b(estimate|roughly how many|approximately how many|how many .* in "
                         r"the world|fermi)\b", re.I)),
    ("creative", re.compile(r"\b(poem|haiku|limerick|story|fable|sonnet|lyrics|song|fiction|rhyme|"
                            r"screenplay|dialogue between)\b", re.I)),
)


@dataclass(frozen=True)
class Suitability:
    suits_sketch: bool
    category: str  # "list" when it suits, else the matched unsuited category
    reason: str


def classify(question: str) -> Suitability:
    for category, pattern in _UNSUITED:
        if pattern.search(question):
            return Suitability(False, category, f"question looks like {category}")
    return Suitability(True, "list", "no sequential-reasoning or single-voice pattern matched")
