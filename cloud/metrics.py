"""Prometheus metrics, one registry per app (so several apps in one process stay apart). Counters
and histograms are updated as requests run; the gauges of the engine, adapters, edges and
connections are read from the live objects at each scrape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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
        self.inflight = Gauge("pice_inflight_requests", "HTTP requests being answered now",
                              ["endpoint"], registry=self.registry)
        self.limited = Counter("pice_limited_requests",
                               "Requests refused with 429 by a rate or stream limit", ["limit"],
                               registry=self.registry)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, open fds, …
        self.runtime = RuntimeCollector()
        self.registry.register(self.runtime)


class RuntimeCollector(Collector):
    """Gauges read at scrape time from the pipeline and the server's connection bounds, which
    the app hands over once they exist (`watch`)."""

    def __init__(self) -> None:
        self._pipeline: Callable[[], Any] = lambda: None
        self._bounds: Callable[[], Any] = lambda: None

    def watch(self, pipeline: Callable[[], Any], bounds: Callable[[], Any]) -> None:
        self._pipeline, self._bounds = pipeline, bounds

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield from _engine_metrics(self._pipeline())
        yield from _edge_metrics(self._pipeline())
        yield from _connection_metrics(self._bounds())


def _engines(pipeline: Any) -> dict[str, Any]:
    """Distinct loaded models served by our paged-KV engine, by model spec."""
    if pipeline is None:
        return {}
    gens = [pipeline.cloud, *getattr(pipeline, "edge_generators", {}).values()]
    return {g.name: g for g in gens if hasattr(getattr(g, "engine", None), "scheduler")}


def _engine_metrics(pipeline: Any) -> Iterator[GaugeMetricFamily]:
    blocks = GaugeMetricFamily("pice_kv_blocks", "KV-cache blocks of each model by state",
                               labels=["model", "state"])
    seqs = GaugeMetricFamily("pice_engine_sequences", "Sequences in each model's engine",
                             labels=["model", "state"])
    slots = GaugeMetricFamily("pice_adapter_slots", "LoRA adapter device slots of each model",
                              labels=["model", "state"])
    for name, gen in _engines(pipeline).items():
        eng = gen.engine
        total, free = eng.blocks.num_blocks, eng.blocks.num_free
        blocks.add_metric([name, "used"], total - free)
        blocks.add_metric([name, "free"], free)
        seqs.add_metric([name, "running"], len(eng.scheduler.running))
        seqs.add_metric([name, "waiting"], len(eng.scheduler.waiting))
        used = len(gen.resident_adapters())
        slots.add_metric([name, "used"], used)
        slots.add_metric([name, "free"], max(0, eng.pool.num_slots - used))
    yield from (blocks, seqs, slots)


def _edge_metrics(pipeline: Any) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    by_state = GaugeMetricFamily("pice_edges", "Edges by kind and state",
                                 labels=["kind", "state"])
    counts: dict[tuple[str, str], int] = {(k, s): 0 for k in ("local", "remote")
                                          for s in ("healthy", "suspect", "draining", "lost")}
    pool = pipeline.edges if pipeline is not None else None
    for edge in pool.edges() if pool is not None else []:
        kind = "local" if getattr(edge, "in_process", False) else "remote"
        if getattr(edge, "draining", False):
            state = "draining"
        elif edge.stats.suspect:
            state = "suspect"
        else:
            state = "healthy" if edge.state().healthy else "lost"
        counts[kind, state] = counts.get((kind, state), 0) + 1
    for (kind, state), n in counts.items():
        by_state.add_metric([kind, state], n)
    yield by_state
    yield GaugeMetricFamily("pice_edge_batches_inflight", "Batches running on edges now",
                            value=getattr(pool, "batches_inflight", 0))
    yield CounterMetricFamily("pice_edge_deadlines_missed",
                              "Edge batches whose deadline ran out (their points moved)",
                              value=getattr(pool, "deadlines_missed", 0))


def _connection_metrics(bounds: Any) -> Iterator[CounterMetricFamily]:
    if bounds is None:
        return
    conns = CounterMetricFamily("pice_connections_closed",
                                "Connections closed by the server's bounds, by reason",
                                labels=["reason"])
    conns.add_metric(["evicted_idle"], bounds.evicted)
    conns.add_metric(["refused_full"], bounds.refused)
    conns.add_metric(["timed_out"], bounds.timed_out)
    yield conns
