"""Measurements age. A decode rate measured during a slow spell (an overloaded machine, a
throttled device) must not decide forever: the scheduler's view of each rate slides back toward
its prior as the measurement grows old, with a half-life, so one slow spell cannot pin `auto`
to a mode. A fresh measurement counts in full again at once. Pure code: the clock is passed in."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pice.scheduler.state import EdgeState


@dataclass(frozen=True)
class FreshnessConfig:
    half_life_s: float = 60.0  # a measurement this old counts half (geometrically) vs the prior
    edge_prior_tokens_per_s: float = 16.25  # an unmeasured edge (PlacementConfig's default)
    cloud_prior_tokens_per_s: float = 5.6  # an unmeasured cloud (PolicyConfig's default)

    def __post_init__(self) -> None:
        if self.half_life_s <= 0:
            raise ValueError(f"half_life_s must be > 0, got {self.half_life_s}")
        if self.edge_prior_tokens_per_s <= 0 or self.cloud_prior_tokens_per_s <= 0:
            raise ValueError(f"freshness priors must be > 0, got {self}")


def weight(age_s: float, half_life_s: float) -> float:
    """How much a measurement `age_s` old still counts, in (0, 1]."""
    return 0.5 ** (max(0.0, age_s) / half_life_s)


def aged_rate(measured: float, prior: float, w: float) -> float:
    """A rate pulled toward `prior` by 1 - w, geometrically (a 0.1 tok/s spell and a 16 tok/s
    prior meet at 1.3 tok/s after one half-life, not at 8). 0 (unmeasured) stays 0."""
    if measured <= 0:
        return 0.0
    return math.exp(w * math.log(measured) + (1.0 - w) * math.log(prior))


class EdgeSpeeds:
    """The age of every edge's latest measurement, seen through the snapshots the scheduler
    gets: a rate or failure rate that changed was just measured; one that did not is as old as
    the snapshot that last changed it."""

    def __init__(self, cfg: FreshnessConfig | None = None) -> None:
        self.cfg = cfg or FreshnessConfig()
        self._seen: dict[str, tuple[float, float, float]] = {}  # id → (rate, failures, since)

    def age(self, edges: tuple[EdgeState, ...], now: float) -> tuple[EdgeState, ...]:
        out = []
        for e in edges:
            rate, failures, since = self._seen.get(e.edge_id, (-1.0, -1.0, now))
            if (rate, failures) != (e.tokens_per_s, e.failure_rate):
                since = now
                self._seen[e.edge_id] = (e.tokens_per_s, e.failure_rate, now)
            w = weight(now - since, self.cfg.half_life_s)
            out.append(e if w >= 1.0 else dataclasses.replace(
                e, tokens_per_s=aged_rate(e.tokens_per_s, self.cfg.edge_prior_tokens_per_s, w),
                failure_rate=e.failure_rate * w))
        if len(self._seen) > 4 * len(edges) + 64:  # forget edges that left
            live = {e.edge_id for e in edges}
            self._seen = {k: v for k, v in self._seen.items() if k in live}
        return tuple(out)
