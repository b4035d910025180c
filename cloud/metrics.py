"""Prometheus metrics, one registry per app (so several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("pice_requests", "Answered requests by the mode that ran",
                                ["mode", "endpoint"], registry=self.registry)
        self.errors = Counter("pice_request_errors", "Requests refused or failed, by HTTP status",
                              ["status"], registry=self.registry)
        self.fallbacks = Counter("pice_fallbacks", "Progressive requests answered in full cloud",
                                 ["reason"], registry=self.registry)
        self.stage_seconds = Histogram("pice_stage_seconds", "Latency of each pipeline stage",
                                       ["stage"], buckets=_BUCKETS, registry=self.registry)
        self.decisions = Counter("pice_decisions", "Scheduler decisions by mode and reason",
                                 ["mode", "reason"], registry=self.registry)
        self.tokens = Counter("pice_tokens", "Generated tokens by tier", ["tier"],
                              registry=self.registry)
        self.guard_repairs = Counter("pice_guard_repairs",
                                     "Points the quality guard had re-expanded, by reason",
                                     ["reason"], registry=self.registry)
        self.ensemble_wins = Counter("pice_ensemble_wins", "Winning candidates by source",
                                     ["model", "adapter"], registry=self.registry)
