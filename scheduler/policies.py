"""The four policies behind `Policy`: two static baselines, the router alone, and the dynamic
policy that weighs the router's probability against measured cloud and edge load."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pice.scheduler.length import LengthModel
from pice.scheduler.placement import EdgeIndex, stream_rate
from pice.scheduler.policy import (
    Decision,
    PolicyConfig,
    QueryFeatures,
    Router,
    point_budget,
    precheck,
    sketch_budget,
    too_long,
)
from pice.scheduler.state import CloudState, ClusterState


def _index(cluster: ClusterState) -> EdgeIndex:
    return cluster.index if cluster.index is not None else EdgeIndex.of(cluster.edges)


def _probability(q: QueryFeatures, router: Router | None) -> float:
    if q.suitability is not None:
        return q.suitability
    assert router is not None, "a policy that reads suitability needs a router or a probability"
    return router(q.question)


def static_progressive(q: QueryFeatures, cfg: PolicyConfig, cluster: ClusterState, reason: str,
                       code: str, probability: float | None = None) -> Decision:
    """The configured sketch shape, whatever the load; points the edges cannot take now are
    left unplaced (the edge pool queues them on the least-loaded edge)."""
    points = min(q.max_points or cfg.default_max_points, 10)
    point_tokens = point_budget(cfg, q, points)
    sketch_tokens = sketch_budget(points, cfg.words_per_point)
    refused = too_long(cfg, q, sketch_tokens, point_tokens)
    if refused is not None:
        return replace(refused, probability=probability)
    busy = cluster.cloud.slots > 0 and cluster.cloud.queue_depth >= cluster.cloud.slots
    ensemble, placement, _ = place_ensemble(cfg, q, _index(cluster), points, busy,
                                            round(point_tokens * cfg.point_fill), points)
    return Decision("progressive", reason, points, cfg.words_per_point, sketch_tokens,
                    point_tokens, ensemble, placement, q.priority, probability, code)


def place_ensemble(cfg: PolicyConfig, q: QueryFeatures, index: EdgeIndex, points: int,
                   busy: bool, expect_point: int, min_placed: int,
                   ) -> tuple[int, tuple[str, ...], float]:
    """The largest ensemble (candidates per point, at most cfg.max_ensemble) whose points all
    find room (`min_placed` of them at least), with its placement and expected seconds. Edges
    have room when their free slots hold every candidate of every point; a busy cloud or a
    batch request gets one candidate (the edges' spare capacity goes to other requests)."""
    top = 1
    if q.priority == "interactive" and not busy:
        top = max(1, min(cfg.max_ensemble, index.free_slots // max(points, 1)))
    for k in range(top, 0, -1):
        placement, seconds = index.place(points, k, q.model, q.adapter, expect_point)
        if len(placement) >= min_placed or k == 1:
            return k, placement, seconds
    raise AssertionError("unreachable: k == 1 returns")


def obeyed(q: QueryFeatures, cfg: PolicyConfig, cluster: ClusterState) -> Decision | None:
    """What every policy does alike: the prechecks, then an explicit `progressive` request."""
    pre = precheck(q, cfg, cluster)
    if pre is None and q.requested_mode == "progressive":
        return static_progressive(q, cfg, cluster, "requested", "requested")
    return pre


@dataclass
class AlwaysCloud:
    cfg: PolicyConfig
    name: str = "always-cloud"

    def decide(self, q: QueryFeatures, cluster: ClusterState) -> Decision:
        pre = obeyed(q, self.cfg, cluster)
        if pre is not None:
            return pre
        return Decision("cloud", "policy always-cloud", priority=q.priority, code="static")


@dataclass
class AlwaysProgressive:
    cfg: PolicyConfig
    name: str = "always-progressive"

    def decide(self, q: QueryFeatures, cluster: ClusterState) -> Decision:
        pre = obeyed(q, self.cfg, cluster)
        if pre is not None:
            return pre
        return static_progressive(q, self.cfg, cluster, "policy always-progressive", "static")


@dataclass
class RouterOnly:
    cfg: PolicyConfig
    router: Router | None = None
    name: str = "router-only"

    def decide(self, q: QueryFeatures, cluster: ClusterState) -> Decision:
        pre = obeyed(q, self.cfg, cluster)
        if pre is not None:
            return pre
        p = _probability(q, self.router)
        if p < self.cfg.threshold:
            return Decision("cloud", f"question does not suit a sketch (p={p:.2f})",
                            priority=q.priority, probability=p, code="unsuited")
        return static_progressive(q, self.cfg, cluster, f"question suits a sketch (p={p:.2f})",
                                  "suited", p)


def cloud_rate(cloud: CloudState, cfg: PolicyConfig, half: float) -> float:
    """Decode rate a new cloud stream gets: measured, else the default at the current batch."""
    if cloud.tokens_per_s > 0:
        return cloud.tokens_per_s
    running = min(cloud.queue_depth, cloud.slots) if cloud.slots else cloud.queue_depth
    return stream_rate(cfg.cloud_tokens_per_s, running + 1, half)


def cloud_wait(cloud: CloudState, priority: str, service_s: float) -> float:
    """Seconds before a new request starts on the cloud: interactive requests pass waiting
    batch ones; each slot frees after about one service time."""
    if cloud.slots <= 0:
        return 0.0
    ahead = cloud.queue_depth - (cloud.batch_depth if priority == "interactive" else 0)
    return max(0, ahead - cloud.slots + 1) / cloud.slots * service_s


@dataclass
class DynamicPolicy:
    """Progressive when the sketch path beats full cloud in expected time: the sketch's cloud
    time plus the slowest placed point. A question the router is unsure of (min_probability <=
    p < threshold) is sketched only to relieve a busy cloud, and then also pays (1 - p) times a
    full answer (a sketch that does not suit gets answered again). A busy cloud shortens the
    sketch, busy edges shrink it or keep it in the cloud, batch requests yield the cloud queue,
    and the ensemble grows when the edges have room for every candidate."""

    cfg: PolicyConfig
    router: Router | None
    lengths: LengthModel
    name: str = "dynamic"

    def decide(self, q: QueryFeatures, cluster: ClusterState) -> Decision:
        cfg = self.cfg
        pre = obeyed(q, cfg, cluster)
        if pre is not None:
            return pre
        p = _probability(q, self.router)
        predicted = self.lengths.predict(q.question, p, q.max_tokens, q.words)
        index = _index(cluster)
        rate = cloud_rate(cluster.cloud, cfg, index.cfg.batch_half)
        wait = cloud_wait(cluster.cloud, q.priority, predicted / rate)
        t_cloud = wait + predicted / rate

        def cloud(reason: str, code: str) -> Decision:
            return Decision("cloud", reason, priority=q.priority, probability=p, code=code,
                            predicted_tokens=predicted)

        if p < cfg.min_probability:
            return cloud(f"question does not suit a sketch (p={p:.2f})", "unsuited")
        points = self.lengths.sketch_points(predicted, min(q.max_points or cfg.default_max_points,
                                                           10))
        busy = wait > 0 or (cluster.cloud.slots > 0
                            and cluster.cloud.queue_depth >= cluster.cloud.slots)
        words = max(cfg.min_words_per_point, cfg.words_per_point - 2) if busy \
            else cfg.words_per_point
        point_tokens = point_budget(cfg, q, points)
        expect_point = round(point_tokens * cfg.point_fill)
        ensemble, placement, expand_s = place_ensemble(cfg, q, index, points, busy,
                                                       expect_point, points)
        if len(placement) < min(points, self.lengths.cfg.min_points):
            return cloud(f"edges busy ({index.free_slots} free slots for {points} points)",
                         "edges-busy")
        points = len(placement)
        sketch_tokens = sketch_budget(points, words)
        refused = too_long(cfg, q, sketch_tokens, point_tokens)
        if refused is not None:
            return replace(refused, probability=p, predicted_tokens=predicted)
        t_sketch = wait + sketch_tokens * cfg.sketch_fill / rate + expand_s
        suited = p >= cfg.threshold
        # an uncertain question also pays, with probability 1 - p, a full answer after the sketch
        expected = t_sketch if suited else t_sketch + (1.0 - p) * t_cloud
        yields = q.priority == "batch" and busy and suited
        if not (suited or busy):
            return cloud(f"question may not suit a sketch (p={p:.2f}) and the cloud is idle",
                         "uncertain")
        if expected >= t_cloud and not yields:
            return cloud(f"cloud faster (p={p:.2f}: ~{expected:.1f}s sketched vs "
                         f"~{t_cloud:.1f}s)", "cloud-faster")
        shape = f"{points} points x {words} words" + (", cloud busy" if busy else "")
        why = "batch yields the cloud" if yields and expected >= t_cloud else \
            f"~{expected:.1f}s vs ~{t_cloud:.1f}s in cloud"
        return Decision("progressive", f"sketch (p={p:.2f}, {shape}; {why})", points, words,
                        sketch_tokens, point_tokens, ensemble, placement, q.priority, p,
                        "suited" if suited else "uncertain-suited", predicted)
