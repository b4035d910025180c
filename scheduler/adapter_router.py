"""Automatic adapter selection (EdgeLoRA's AAS): a request that names no adapter gets the one
whose card (a description and example prompts) is closest to it in sentence-embedding space, or
none when nothing is close enough. Among near-ties it prefers an adapter already resident on the
device, since a swap-in costs latency and the quality difference within the margin is noise.

The math is pure numpy over unit-length embeddings; the only I/O is the injected `encode`
(`pice.shared.embeddings.get_embedder().encode` in the server)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import numpy as np

Encode = Callable[[list[str]], np.ndarray]  # texts → float32 [n, dim], rows of unit length


@dataclass(frozen=True)
class RouterConfig:
    threshold: float = 0.2  # best score below it → no adapter (the base model answers)
    margin: float = 0.03  # scores within it of the best count as a tie (cache preference)
    example_weight: float = 0.5  # score = (1-w)·cos(centroid) + w·max cos(description/examples)

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [-1, 1], got {self.threshold}")
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"margin must be in [0, 1], got {self.margin}")
        if not 0.0 <= self.example_weight <= 1.0:
            raise ValueError(f"example_weight must be in [0, 1], got {self.example_weight}")


@dataclass(frozen=True)
class CardVectors:
    centroid: np.ndarray  # [dim], unit length: mean of the description and examples
    texts: np.ndarray  # [1 + examples, dim]: the description's and each example's embedding


@dataclass(frozen=True)
class AdapterChoice:
    adapter: str | None  # the pick; None → base model
    score: float  # the pick's score (the best score when there is no pick)
    best: str | None  # the top-scoring adapter before the cache preference
    ranked: tuple[tuple[str, float], ...]  # every candidate, best first
    cache_preferred: bool  # a resident near-tie was chosen over a better non-resident one
    reason: str


def card_vectors(texts: np.ndarray) -> CardVectors:
    """texts: [n, dim] unit rows (description first, then examples)."""
    assert texts.ndim == 2 and texts.shape[0] >= 1, texts.shape
    mean = texts.mean(axis=0)  # [dim]
    norm = float(np.linalg.norm(mean))
    return CardVectors(centroid=mean / norm if norm > 0 else mean, texts=texts)


def score_cards(query: np.ndarray, cards: Mapping[str, CardVectors],
                example_weight: float = 0.5) -> dict[str, float]:
    """Cosine scores of one query embedding ([dim], unit length) against each card."""
    out: dict[str, float] = {}
    for name, card in cards.items():
        centroid = float(card.centroid @ query)
        nearest = float((card.texts @ query).max())  # [n] → best single text
        out[name] = (1.0 - example_weight) * centroid + example_weight * nearest
    return out


def select(scores: Mapping[str, float], resident: AbstractSet[str],
           cfg: RouterConfig) -> AdapterChoice:
    """Best adapter above the threshold; a resident one wins among those within the margin."""
    ranked = tuple(sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])))
    if not ranked:
        return AdapterChoice(None, 0.0, None, (), False, "no adapter has a card to match")
    best, top = ranked[0]
    if top < cfg.threshold:
        return AdapterChoice(None, top, best, ranked, False,
                             f"best match {best} scored {top:.3f} < threshold {cfg.threshold}")
    if best in resident:
        return AdapterChoice(best, top, best, ranked, False, f"best match, resident ({top:.3f})")
    ties = [(n, s) for n, s in ranked[1:]
            if s >= top - cfg.margin and s >= cfg.threshold and n in resident]
    if ties:
        name, score = ties[0]
        return AdapterChoice(name, score, best, ranked, True,
                             f"resident {name} ({score:.3f}) within {cfg.margin} of {best} "
                             f"({top:.3f})")
    return AdapterChoice(best, top, best, ranked, False, f"best match ({top:.3f})")


class AdapterRouter:
    """Cards by adapter name; embeddings computed lazily on the first route that needs them."""

    def __init__(self, encode: Encode, cfg: RouterConfig | None = None) -> None:
        self.encode = encode
        self.cfg = cfg or RouterConfig()
        self._lock = threading.Lock()
        self._texts: dict[str, list[str]] = {}  # adapter → description + examples
        self._vectors: dict[str, CardVectors] = {}

    def set_card(self, name: str, description: str, examples: Iterable[str]) -> None:
        texts = [t.strip() for t in [description, *examples] if t.strip()]
        with self._lock:
            self._vectors.pop(name, None)
            if texts:
                self._texts[name] = texts
            else:  # a card with no text cannot be matched: AAS never picks it
                self._texts.pop(name, None)

    def remove(self, name: str) -> None:
        with self._lock:
            self._texts.pop(name, None)
            self._vectors.pop(name, None)

    def _cards(self, names: Iterable[str]) -> dict[str, CardVectors]:
        with self._lock:
            wanted = [n for n in names if n in self._texts]
            missing = [n for n in wanted if n not in self._vectors]
            if missing:
                flat = [t for n in missing for t in self._texts[n]]
                emb = self.encode(flat)  # [sum of card texts, dim]
                start = 0
                for n in missing:
                    k = len(self._texts[n])
                    self._vectors[n] = card_vectors(emb[start:start + k])
                    start += k
            return {n: self._vectors[n] for n in wanted}

    def scores(self, query: str, candidates: Iterable[str]) -> dict[str, float]:
        cards = self._cards(candidates)
        if not cards:
            return {}
        [q] = self.encode([query])  # q: [dim]
        return score_cards(q, cards, self.cfg.example_weight)

    def route(self, query: str, candidates: Iterable[str],
              resident: AbstractSet[str] = frozenset()) -> AdapterChoice:
        return select(self.scores(query, candidates), resident, self.cfg)
