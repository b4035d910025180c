"""Suitability router: the calibrated probability that a question's answer is a list of
independent points (Skeleton-of-Thought's rule), from a MiniLM sentence embedding and a logistic
regression with Platt scaling. The weights ship as JSON (`data/suitability_router.json`, made by
`pice route train`); nothing is unpickled."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from pice.shared.embeddings import DEFAULT_EMBEDDER, Embedder, get_embedder

WEIGHTS_FILE = "suitability_router.json"


@dataclass(frozen=True)
class RouterWeights:
    embedder: str  # embedding model spec the coefficients were trained on
    coef: tuple[float, ...]  # logistic-regression weights, one per embedding dimension
    intercept: float
    platt_a: float  # calibrated p = sigmoid(platt_a * score + platt_b), score = coef·x + intercept
    platt_b: float
    threshold: float = 0.5  # p at or above → "suits a sketch"
    report: dict[str, Any] = field(default_factory=dict)  # held-out scores written by training

    def __post_init__(self) -> None:
        if not self.coef:
            raise ValueError("router weights have no coefficients")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"router threshold must be in (0, 1), got {self.threshold}")

    @classmethod
    def load(cls, path: Path | None = None) -> RouterWeights:
        """The shipped weights, or the JSON file at `path`."""
        if path is None:
            text = resources.files("pice.scheduler").joinpath("data", WEIGHTS_FILE).read_text()
        else:
            text = Path(path).read_text()
        raw = json.loads(text)
        raw["coef"] = tuple(float(c) for c in raw["coef"])
        return cls(**raw)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")


class SuitabilityRouter:
    """`probability(questions)` → calibrated P(suits a sketch) per question."""

    def __init__(self, weights: RouterWeights | None = None,
                 embedder: Embedder | None = None, warm: bool = False) -> None:
        self.weights = weights or RouterWeights.load()
        self._embedder = embedder
        self._coef = np.asarray(self.weights.coef, dtype=np.float32)  # [dim]
        if warm:  # load the embedder now rather than on the first question
            _ = self.embedder

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = get_embedder(self.weights.embedder or DEFAULT_EMBEDDER)
        return self._embedder

    def probability(self, questions: list[str]) -> np.ndarray:
        return self.probability_from_embeddings(self.embedder.encode(questions))

    def probability_from_embeddings(self, emb: np.ndarray) -> np.ndarray:
        # emb: [n, dim] unit rows → [n] probabilities
        assert emb.shape[1] == self._coef.shape[0], (emb.shape, self._coef.shape)
        score = emb @ self._coef + self.weights.intercept
        z = self.weights.platt_a * score.astype(np.float64) + self.weights.platt_b
        return 1.0 / (1.0 + np.exp(-z))

    def suits(self, p: float) -> bool:
        return p >= self.weights.threshold
