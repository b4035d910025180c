"""Length model: the full-cloud answer's expected tokens, and the sketch budget that follows.

A running mean per bucket of (suits a sketch?, question length) learned from completed full-cloud
answers, starting from a prior; words in the question that ask for brevity or depth scale it.
Truncated answers (they hit max_tokens) only ever raise a bucket: the true length was longer."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SHORT = re.compile(r"\b(brief(ly)?|short|one sentence|in a sentence|quick(ly)?|tl;?dr|"
                    r"summari[sz]e|in \d+ words)\b", re.I)
_LONG = re.compile(r"\b(detail(ed)?|in depth|thorough(ly)?|comprehensive|essay|elaborate|"
                   r"step by step)\b", re.I)


@dataclass(frozen=True)
class LengthConfig:
    prior_tokens: float = 220.0  # before any history (progressive.json: 168 at a 192 cap)
    prior_weight: float = 4.0  # the prior counts as this many observed answers
    tokens_per_point: int = 40  # answer tokens one sketch point stands for
    min_points: int = 3
    max_history: float = 500.0  # weight cap: old answers fade once this many are seen

    def __post_init__(self) -> None:
        if self.prior_tokens <= 0 or self.tokens_per_point < 1 or self.min_points < 1:
            raise ValueError(f"length config needs positive values, got {self}")


def _bucket(probability: float, words: int) -> tuple[bool, int]:
    return probability >= 0.5, min(words // 8, 3)


def _hint(question: str) -> float:
    if _SHORT.search(question):
        return 0.4
    if _LONG.search(question):
        return 1.5
    return 1.0


class LengthModel:
    """`predict(...)` → expected answer tokens; `observe(...)` after each full-cloud answer."""

    def __init__(self, cfg: LengthConfig | None = None) -> None:
        self.cfg = cfg or LengthConfig()
        self._mean: dict[tuple[bool, int], float] = {}
        self._weight: dict[tuple[bool, int], float] = {}
        self.observed = 0

    def predict(self, question: str, probability: float, max_tokens: int, words: int = -1
                ) -> int:
        words = len(question.split()) if words < 0 else words
        mean = self._mean.get(_bucket(probability, words), self.cfg.prior_tokens)
        return max(1, min(max_tokens, round(mean * _hint(question))))

    def observe(self, question: str, probability: float, tokens: int, max_tokens: int,
                words: int = -1) -> None:
        words = len(question.split()) if words < 0 else words
        key = _bucket(probability, words)
        value = tokens / _hint(question)
        mean = self._mean.get(key, self.cfg.prior_tokens)
        if tokens >= max_tokens and value <= mean:
            return  # truncated: says only that the answer is longer than `value`
        w = self._weight.get(key, self.cfg.prior_weight)
        self._mean[key] = mean + (value - mean) / (w + 1)
        self._weight[key] = min(w + 1, self.cfg.max_history)
        self.observed += 1

    def sketch_points(self, predicted_tokens: int, max_points: int) -> int:
        points = round(predicted_tokens / self.cfg.tokens_per_point)
        return max(min(self.cfg.min_points, max_points), min(points, max_points))
