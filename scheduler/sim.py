"""Discrete-event simulator of the cloud + edge tiers that runs the real policies and the real
placement index (imported, not copied) at internet scale.

Model (each rate is a measured figure; see `SimConfig`):
- requests arrive Poisson (or gamma, `arrival_cv` != 1); each draws a (router probability, true
  label) pair from `mix` (held-out router outputs), a priority, a question length and the
  full-cloud answer length (gamma, capped at max_tokens);
- the cloud is `cloud_replicas` servers of `cloud_slots` streams; interactive requests pass
  waiting batch ones; a job's per-stream rate is fixed when it starts, from the batch it joins
  (saturating batching: r1 (1 + h) / (b + h), fitted to engine.json);
- progressive: the cloud writes the sketch (`sketch_fill` of its budget), then each point runs on
  its placed edge (or, if that edge is full or down, on the better of two random live edges),
  `point_fill` of its budget at the edge's batched rate plus its round-trip time; a failed point
  is expanded in the cloud; a sketch of a question that does not suit is answered again in full
  (the quality guard's cost);
- edges differ in speed and round-trip time (log-normal), some are flaky, and edges crash and come
  back (exponential times); the index sees each change as it happens."""

from __future__ import annotations

import heapq
import math
import random
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pice.scheduler.length import LengthModel
from pice.scheduler.placement import EdgeIndex, PlacementConfig, stream_rate
from pice.scheduler.policy import Decision, Policy, PolicyConfig, QueryFeatures, make_policy
from pice.scheduler.state import CloudState, ClusterState, EdgeState


@dataclass(frozen=True)
class SimConfig:
    requests: int = 2000
    load: float = 0.5  # offered load: full-cloud token demand / cloud token capacity
    edges: int = 100
    edge_slots: int = 8
    edge_tokens_per_s: float = 16.25  # engine.json: 0.5B fp32 batch 1 on our 2-core machine
    edge_speed_sigma: float = 0.5  # log-normal spread of edge speed
    rtt_median_s: float = 0.05
    rtt_sigma: float = 0.8
    flaky_share: float = 0.05  # edges whose points fail at `flaky_failure`
    flaky_failure: float = 0.3
    edge_mtbf_s: float = 3600.0  # mean time between crashes per edge
    edge_down_s: float = 120.0
    cloud_replicas: int = 10
    cloud_slots: int = 16
    cloud_tokens_per_s: float = 5.6  # progressive.json: 1.5B full-cloud decode, batch 1
    batch_half: float = 7.0  # engine.json fit of batched decode (see placement.stream_rate)
    prefill_s: float = 0.3
    answer_tokens_mean: float = 240.0
    answer_tokens_shape: float = 4.0
    max_tokens: int = 512
    batch_share: float = 0.3  # requests with priority "batch"
    arrival_cv: float = 1.0  # 1: Poisson; otherwise gamma inter-arrival times with this CV
    seed: int = 0
    mix: tuple[tuple[float, bool], ...] = ((0.95, True), (0.05, False))

    def __post_init__(self) -> None:
        for name in ("requests", "edges", "edge_slots", "cloud_replicas", "cloud_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.load <= 0 or self.arrival_cv <= 0:
            raise ValueError(f"load and arrival_cv must be > 0, got {self.load}, "
                             f"{self.arrival_cv}")
        if not self.mix:
            raise ValueError("mix needs at least one (probability, label) pair")

    @property
    def cloud_capacity(self) -> float:
        """Cloud tokens/s with every slot busy."""
        per = stream_rate(self.cloud_tokens_per_s, self.cloud_slots, self.batch_half)
        return self.cloud_replicas * self.cloud_slots * per

    @property
    def arrival_rate(self) -> float:
        return self.load * self.cloud_capacity / self.answer_tokens_mean


@dataclass
class _Req:
    t0: float
    p: float
    label: bool
    priority: str
    tokens: int  # full-cloud answer length
    words: int
    decision: Decision | None = None
    points_left: int = 0
    redo: bool = False


@dataclass
class _Edge:
    state: EdgeState
    fail_p: float
    queue: deque[tuple[_Req, int, int]] = field(default_factory=deque)  # (req, tokens, need)
    running: dict[int, tuple[_Req, int, int]] = field(default_factory=dict)
    epoch: int = 0
    seen: float = 0.0  # points finished or failed (failure-rate estimate)
    failed: float = 0.0


ARRIVE, CLOUD_DONE, POINT_DONE, EDGE_DOWN, EDGE_UP = range(5)


class Simulation:
    def __init__(self, cfg: SimConfig, policy: Policy, lengths: LengthModel | None = None
                 ) -> None:
        self.cfg = cfg
        self.policy = policy
        self.lengths = lengths
        # common random numbers: every policy sees the same fleet and the same requests
        fleet = random.Random(cfg.seed)
        self.wl = random.Random(cfg.seed + 1)  # arrivals and request attributes
        self.rng = random.Random(cfg.seed + 2)  # crashes, point failures, fallback picks
        self.index = EdgeIndex(PlacementConfig(batch_half=cfg.batch_half,
                                               default_tokens_per_s=cfg.edge_tokens_per_s))
        self.edges: dict[str, _Edge] = {}
        self.edge_ids: list[str] = []
        for i in range(cfg.edges):
            eid = f"e{i}"
            speed = cfg.edge_tokens_per_s * math.exp(fleet.gauss(0, cfg.edge_speed_sigma))
            rtt = cfg.rtt_median_s * math.exp(fleet.gauss(0, cfg.rtt_sigma))
            fail = cfg.flaky_failure if fleet.random() < cfg.flaky_share else 0.0
            e = _Edge(EdgeState(eid, ("edge",), cfg.edge_slots, 0, speed, rtt), fail)
            self.edges[eid] = e
            self.edge_ids.append(eid)
            self.index.upsert(e.state)
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.running = [0] * cfg.cloud_replicas
        self.waiting: tuple[deque[tuple[_Req, int]], deque[tuple[_Req, int]]] = (deque(),
                                                                                  deque())
        self.cloud_busy = 0
        self.latency = array("d")
        self.interactive_latency = array("d")
        self.decide_s = array("d")
        self.modes = {"cloud": 0, "progressive": 0}
        self.redos = 0
        self.now = 0.0

    # -- events ----------------------------------------------------------------------------
    def _at(self, t: float, kind: int, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, payload))

    def run(self) -> dict[str, Any]:
        cfg, rng, wl = self.cfg, self.rng, self.wl
        rate = cfg.arrival_rate
        shape = 1.0 / cfg.arrival_cv ** 2
        t = 0.0
        for _ in range(cfg.requests):  # arrivals are scheduled lazily, one ahead
            t += wl.expovariate(rate) if cfg.arrival_cv == 1 else \
                wl.gammavariate(shape, 1.0 / (shape * rate))
            self._at(t, ARRIVE, None)
            break
        self._arrivals_left = cfg.requests - 1
        self._next_arrival = t
        if cfg.edge_mtbf_s > 0:
            for eid in self.edge_ids:
                self._at(rng.expovariate(1.0 / cfg.edge_mtbf_s), EDGE_DOWN, eid)
        wall0 = time.perf_counter()
        done = 0
        while self.events and done < cfg.requests:
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == ARRIVE:
                self._arrive()
                if self._arrivals_left > 0:
                    self._arrivals_left -= 1
                    self._next_arrival += wl.expovariate(rate) if cfg.arrival_cv == 1 else \
                        wl.gammavariate(shape, 1.0 / (shape * rate))
                    self._at(self._next_arrival, ARRIVE, None)
            elif kind == CLOUD_DONE:
                done += self._cloud_done(*payload)
            elif kind == POINT_DONE:
                done += self._point_done(*payload)
            elif kind == EDGE_DOWN:
                self._edge_down(payload)
            else:
                self._edge_up(payload)
        return self._report(time.perf_counter() - wall0, done)

    # -- arrivals and decisions ------------------------------------------------------------
    def _arrive(self) -> None:
        cfg, wl = self.cfg, self.wl
        p, label = cfg.mix[wl.randrange(len(cfg.mix))]
        tokens = min(cfg.max_tokens, max(8, round(wl.gammavariate(
            cfg.answer_tokens_shape, cfg.answer_tokens_mean / cfg.answer_tokens_shape))))
        req = _Req(self.now, p, label, "batch" if wl.random() < cfg.batch_share
                   else "interactive", tokens, wl.randint(5, 30))
        free = min(self.running)
        cloud = CloudState(self.cloud_busy, stream_rate(cfg.cloud_tokens_per_s, free + 1,
                                                        cfg.batch_half),
                           cfg.cloud_replicas * cfg.cloud_slots, len(self.waiting[1]))
        q = QueryFeatures("", "auto", cfg.max_tokens, None, suitability=p,
                          priority=req.priority, words=req.words)
        t0 = time.perf_counter()
        d = self.policy.decide(q, ClusterState(cloud, (), self.index))
        self.decide_s.append(time.perf_counter() - t0)
        req.decision = d
        self.modes[d.mode] += 1
        if d.mode == "cloud":
            self._cloud_job(req, req.tokens)
        else:
            self._cloud_job(req, -max(4, round(d.sketch_tokens * 0.6)))  # negative: a sketch

    # -- cloud -----------------------------------------------------------------------------
    def _cloud_job(self, req: _Req, tokens: int) -> None:
        """tokens > 0: a full answer; < 0: a sketch of -tokens; a point is ("point", tokens)."""
        self.cloud_busy += 1
        free = min(range(len(self.running)), key=self.running.__getitem__)
        if self.running[free] < self.cfg.cloud_slots:
            self._cloud_start(free, req, tokens)
        else:
            self.waiting[req.priority == "batch"].append((req, tokens))

    def _cloud_start(self, replica: int, req: _Req, tokens: int) -> None:
        cfg = self.cfg
        self.running[replica] += 1
        r = stream_rate(cfg.cloud_tokens_per_s, self.running[replica], cfg.batch_half)
        n = abs(tokens) if not isinstance(tokens, tuple) else tokens[1]
        self._at(self.now + cfg.prefill_s + n / r, CLOUD_DONE, (replica, req, tokens))

    def _cloud_done(self, replica: int, req: _Req, tokens: Any) -> int:
        self.running[replica] -= 1
        self.cloud_busy -= 1
        for q in self.waiting:
            if q:
                nreq, ntok = q.popleft()
                self._cloud_start(replica, nreq, ntok)
                break
        if isinstance(tokens, tuple):  # a failed point re-expanded in the cloud
            return self._point_finished(req)
        if tokens < 0:
            self._dispatch(req)
            return 0
        if self.lengths is not None and not req.redo:
            self.lengths.observe("", req.p, req.tokens, self.cfg.max_tokens, req.words)
        return self._finish(req)

    # -- edges -----------------------------------------------------------------------------
    def _dispatch(self, req: _Req) -> None:
        d = req.decision
        assert d is not None
        tokens = max(4, round(d.point_tokens * 0.5))
        req.points_left = d.max_points
        for i in range(d.max_points):
            eid = d.placement[i] if i < len(d.placement) else ""
            e = self.edges.get(eid)
            if e is None or not e.state.healthy or e.state.free < d.ensemble:
                e = self._fallback_edge()
            if e is None:
                self._cloud_job(req, ("point", tokens))  # type: ignore[arg-type]
            elif e.state.free >= d.ensemble:
                self._point_start(e, req, tokens, d.ensemble)
            else:
                e.queue.append((req, tokens, d.ensemble))

    def _fallback_edge(self) -> _Edge | None:
        """The better of two random live edges (shorter queue, then more free slots)."""
        best: _Edge | None = None
        live = 0
        for _ in range(16):  # up to 16 draws to find two live edges
            e = self.edges[self.edge_ids[self.rng.randrange(len(self.edge_ids))]]
            if not e.state.healthy:
                continue
            if best is None or (len(e.queue), -e.state.free) < (len(best.queue),
                                                                -best.state.free):
                best = e
            live += 1
            if live == 2:
                break
        return best

    def _point_start(self, e: _Edge, req: _Req, tokens: int, need: int) -> None:
        s = e.state
        self.seq += 1
        e.running[self.seq] = (req, tokens, need)
        self._take(e, need)
        r = stream_rate(s.tokens_per_s, e.state.inflight, self.cfg.batch_half)
        self._at(self.now + s.rtt_s + tokens / r, POINT_DONE, (e, self.seq, e.epoch))

    def _take(self, e: _Edge, slots: int) -> None:
        s = e.state
        rate = e.failed / e.seen if e.seen else 0.0
        e.state = EdgeState(s.edge_id, s.models, s.slots, s.inflight + slots, s.tokens_per_s,
                            s.rtt_s, s.adapters, s.healthy, rate)
        self.index.upsert(e.state)

    def _point_done(self, e: _Edge, key: int, epoch: int) -> int:
        if epoch != e.epoch:
            return 0  # the edge crashed meanwhile; its points were moved already
        req, tokens, need = e.running.pop(key)
        failed = e.fail_p > 0 and self.rng.random() < e.fail_p
        e.seen = 0.98 * e.seen + 1
        e.failed = 0.98 * e.failed + failed
        self._take(e, -need)
        while e.queue and e.state.free >= e.queue[0][2]:
            self._point_start(e, *e.queue.popleft())
        if failed:
            self._cloud_job(req, ("point", tokens))  # type: ignore[arg-type]
            return 0
        return self._point_finished(req)

    def _point_finished(self, req: _Req) -> int:
        req.points_left -= 1
        if req.points_left > 0:
            return 0
        if not req.label and not req.redo:  # the sketch did not suit: answered again in full
            req.redo = True
            self.redos += 1
            self._cloud_job(req, req.tokens)
            return 0
        return self._finish(req)

    def _edge_down(self, eid: str) -> None:
        e = self.edges[eid]
        e.epoch += 1
        s = e.state
        e.state = EdgeState(s.edge_id, s.models, s.slots, 0, s.tokens_per_s, s.rtt_s,
                            s.adapters, False, s.failure_rate)
        self.index.upsert(e.state)
        lost = list(e.running.values()) + list(e.queue)
        e.running.clear()
        e.queue.clear()
        for req, tokens, _ in lost:
            self._cloud_job(req, ("point", tokens))  # type: ignore[arg-type]
        self._at(self.now + self.rng.expovariate(1.0 / self.cfg.edge_down_s), EDGE_UP, eid)

    def _edge_up(self, eid: str) -> None:
        e = self.edges[eid]
        s = e.state
        e.state = EdgeState(s.edge_id, s.models, s.slots, 0, s.tokens_per_s, s.rtt_s,
                            s.adapters, True, s.failure_rate)
        self.index.upsert(e.state)
        self._at(self.now + self.rng.expovariate(1.0 / self.cfg.edge_mtbf_s), EDGE_DOWN, eid)

    # -- results ---------------------------------------------------------------------------
    def _finish(self, req: _Req) -> int:
        latency = self.now - req.t0
        self.latency.append(latency)
        if req.priority == "interactive":
            self.interactive_latency.append(latency)
        return 1

    def _report(self, wall_s: float, done: int) -> dict[str, Any]:
        def pct(xs: array[float], q: float) -> float:
            s = sorted(xs)
            return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")

        lat = self.latency
        return {
            "policy": self.policy.name, "load": self.cfg.load, "requests": done,
            "latency_mean_s": sum(lat) / max(1, len(lat)), "latency_p99_s": pct(lat, 0.99),
            "interactive_mean_s": sum(self.interactive_latency) / max(
                1, len(self.interactive_latency)),
            "interactive_p99_s": pct(self.interactive_latency, 0.99),
            "throughput_rps": done / self.now if self.now else 0.0,
            "offered_rps": self.cfg.arrival_rate,
            "progressive_share": self.modes["progressive"] / max(1, sum(self.modes.values())),
            "redo_share": self.redos / max(1, done),
            "decision_p50_ms": 1e3 * pct(self.decide_s, 0.5),
            "decision_p99_ms": 1e3 * pct(self.decide_s, 0.99),
            "wall_s": wall_s,
        }


def simulate(cfg: SimConfig, policy_name: str, policy_cfg: PolicyConfig | None = None
             ) -> dict[str, Any]:
    """One run of `policy_name` (the real policy, no router model: probabilities come from
    `cfg.mix`)."""
    lengths = LengthModel()
    policy = make_policy(policy_name, policy_cfg or PolicyConfig(max_ensemble=1),
                         lengths=lengths)
    return Simulation(cfg, policy, lengths).run()
