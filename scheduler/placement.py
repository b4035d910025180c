"""Points → edges. Each edge's cost is the expected seconds to expand one point on it now:
round-trip time + point tokens at its per-stream rate with one more stream in its batch, scaled
up by its failure rate; an adapter that is not resident adds its load time. Edges with a free
slot sit in lazy min-heaps per model (and per model+adapter for resident adapters), so a
placement pops a handful of entries instead of scanning every edge: O(k log n)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from pice.scheduler.state import EdgeState

ANY_MODEL = ""


@dataclass(frozen=True)
class PlacementConfig:
    point_tokens: int = 32  # nominal tokens per point that orders the heaps
    default_tokens_per_s: float = 16.25  # unmeasured edge: engine.json, 0.5B fp32 batch 1
    batch_half: float = 7.0  # stream rate at batch b = r1 * (1 + h) / (b + h) (engine.json fit)
    adapter_load_s: float = 0.5  # cost of loading a non-resident adapter
    failure_weight: float = 4.0  # a failing point costs a re-dispatch: cost *= 1 + w * rate

    def __post_init__(self) -> None:
        if self.point_tokens < 1 or self.default_tokens_per_s <= 0 or self.batch_half <= 0:
            raise ValueError(f"placement config needs positive values, got {self}")


def stream_rate(tokens_per_s: float, batch: int, half: float) -> float:
    """Per-stream decode rate at `batch` streams, from the batch-1 rate (saturating batching)."""
    return tokens_per_s * (1.0 + half) / (batch + half)


class EdgeIndex:
    """Live placement index. Owners call `upsert` when an edge's state changes (slots taken or
    freed, rate or failure rate re-measured) and `remove` when it leaves."""

    def __init__(self, cfg: PlacementConfig | None = None) -> None:
        self.cfg = cfg or PlacementConfig()
        self.edges: dict[str, EdgeState] = {}
        self._version: dict[str, int] = {}
        # heap key → [(cost, version, edge id)]; stale entries are skipped and dropped lazily
        self._heaps: dict[tuple[str, str], list[tuple[float, int, str]]] = {}
        self._entries = 0
        self.free_slots = 0
        self.healthy = 0

    @classmethod
    def of(cls, edges: Iterable[EdgeState], cfg: PlacementConfig | None = None) -> EdgeIndex:
        index = cls(cfg)
        for e in edges:
            index.upsert(e)
        return index

    def cost(self, e: EdgeState, extra: int = 0, point_tokens: int | None = None,
             adapter: str | None = None) -> float:
        """Expected seconds for one more point on `e` with `extra` points already placed."""
        rate = stream_rate(e.tokens_per_s or self.cfg.default_tokens_per_s,
                           e.inflight + extra + 1, self.cfg.batch_half)
        seconds = e.rtt_s + (point_tokens or self.cfg.point_tokens) / rate
        if adapter is not None and adapter not in e.adapters:
            seconds += self.cfg.adapter_load_s
        return seconds * (1.0 + self.cfg.failure_weight * e.failure_rate)

    def upsert(self, e: EdgeState) -> None:
        old = self.edges.get(e.edge_id)
        if old is not None:
            self.free_slots -= old.free
            self.healthy -= old.healthy
        self.edges[e.edge_id] = e
        self.free_slots += e.free
        self.healthy += e.healthy
        version = self._version.get(e.edge_id, 0) + 1
        self._version[e.edge_id] = version
        if e.free > 0:
            entry = (self.cost(e), version, e.edge_id)
            for model in (ANY_MODEL, *e.models):
                self._push((model, ""), entry)
                for adapter in e.adapters:
                    self._push((model, adapter), entry)
        if self._entries > 4 * len(self.edges) + 64:
            self._rebuild()

    def remove(self, edge_id: str) -> None:
        old = self.edges.pop(edge_id, None)
        if old is not None:
            self.free_slots -= old.free
            self.healthy -= old.healthy
            self._version[edge_id] = self._version.get(edge_id, 0) + 1

    def take(self, edge_id: str, slots: int) -> None:
        """Mark `slots` more points running on `edge_id` (negative: finished)."""
        e = self.edges[edge_id]
        self.upsert(EdgeState(e.edge_id, e.models, e.slots, max(0, e.inflight + slots),
                              e.tokens_per_s, e.rtt_s, e.adapters, e.healthy, e.failure_rate))

    def place(self, points: int, need: int = 1, model: str | None = None,
              adapter: str | None = None, point_tokens: int | None = None,
              ) -> tuple[tuple[str, ...], float]:
        """An edge per point (fewer when free slots run out) and the expected seconds until the
        last point is done. `need` slots per point (ensemble candidates run on the point's edge).
        The index is not changed: the caller `take`s the slots when it dispatches."""
        model_key = model or ANY_MODEL
        keys = [(model_key, "")] + ([(model_key, adapter)] if adapter else [])
        # pop a few cheapest live entries; an edge can take several points while it has slots
        cands: dict[str, EdgeState] = {}
        popped: list[tuple[tuple[str, str], tuple[float, int, str]]] = []
        for key in keys:
            heap, found = self._heaps.get(key, []), 0
            while heap and found < points + 4:
                entry = heapq.heappop(heap)
                self._entries -= 1
                _, version, eid = entry
                if self._version.get(eid) != version:
                    continue  # stale: the edge changed since this entry was pushed
                popped.append((key, entry))
                cands.setdefault(eid, self.edges[eid])
                found += 1
        for key, entry in popped:
            self._push(key, entry)
        extra: dict[str, int] = {}
        chosen: list[str] = []
        worst = 0.0
        for _ in range(points):
            best, best_cost = None, float("inf")
            for eid, e in cands.items():
                if e.free - extra.get(eid, 0) < need:
                    continue
                c = self.cost(e, extra.get(eid, 0), point_tokens, adapter)
                if c < best_cost:
                    best, best_cost = eid, c
            if best is None:
                break
            extra[best] = extra.get(best, 0) + need
            chosen.append(best)
            worst = max(worst, best_cost)
        return tuple(chosen), worst

    def _push(self, key: tuple[str, str], entry: tuple[float, int, str]) -> None:
        heapq.heappush(self._heaps.setdefault(key, []), entry)
        self._entries += 1

    def _rebuild(self) -> None:
        self._heaps.clear()
        self._entries = 0
        for e in list(self.edges.values()):
            self._version[e.edge_id] += 1
            if e.free > 0:
                entry = (self.cost(e), self._version[e.edge_id], e.edge_id)
                for model in (ANY_MODEL, *e.models):
                    self._push((model, ""), entry)
                    for adapter in e.adapters:
                        self._push((model, adapter), entry)
