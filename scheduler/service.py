"""What a server holds of the scheduler: one policy, the router and length model it reads (loaded
once), and the cloud measurements the pipeline reports (queue depth, decode rate)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pice.scheduler.freshness import EdgeSpeeds, FreshnessConfig, aged_rate, weight
from pice.scheduler.length import LengthModel
from pice.scheduler.policy import Decision, Policy, PolicyConfig, QueryFeatures, make_policy
from pice.scheduler.router import SuitabilityRouter
from pice.scheduler.state import CloudState, ClusterState, EdgeState

log = logging.getLogger(__name__)


@dataclass
class CloudMeter:
    """Requests on the cloud model now, and an exponential mean of its measured decode rate
    (which slides back toward the prior as it ages: see freshness.py)."""

    queue_depth: int = 0
    batch_depth: int = 0
    tokens_per_s: float = 0.0
    slots: int = 0  # streams the cloud model decodes at once (0: unknown → no queue estimate)
    alpha: float = 0.2  # weight of the newest measurement
    freshness: FreshnessConfig = field(default_factory=FreshnessConfig)
    clock: Callable[[], float] = time.monotonic
    measured_at: float = 0.0  # clock() of the latest rate measurement

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def start(self, priority: str) -> None:
        with self._lock:
            self.queue_depth += 1
            self.batch_depth += priority == "batch"

    def finish(self, priority: str, tokens: int, seconds: float) -> None:
        with self._lock:
            self.queue_depth -= 1
            self.batch_depth -= priority == "batch"
        self.observe_rate(tokens, seconds)

    def observe_rate(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        with self._lock:
            # an old mean counts as much as it is still worth (fresh: 1 - alpha)
            keep = (1 - self.alpha) * weight(self.clock() - self.measured_at,
                                             self.freshness.half_life_s)
            self.tokens_per_s = rate if self.tokens_per_s == 0 else \
                aged_rate(self.tokens_per_s, rate, keep)
            self.measured_at = self.clock()

    def rate(self) -> float:
        """The measured rate as the scheduler sees it now: aged toward the prior."""
        w = weight(self.clock() - self.measured_at, self.freshness.half_life_s)
        return aged_rate(self.tokens_per_s, self.freshness.cloud_prior_tokens_per_s, w)

    def state(self) -> CloudState:
        return CloudState(self.queue_depth, self.rate(), self.slots, self.batch_depth)


class Scheduler:
    def __init__(self, policy: Policy, router: SuitabilityRouter | None,
                 lengths: LengthModel, cloud_slots: int = 0,
                 freshness: FreshnessConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.router = router
        self.lengths = lengths
        fresh = freshness or FreshnessConfig()
        self.clock = clock
        self.cloud = CloudMeter(slots=cloud_slots, freshness=fresh, clock=clock)
        self.edge_speeds = EdgeSpeeds(fresh)  # ages the edges' measured rates

    @classmethod
    def build(cls, name: str = "dynamic", cfg: PolicyConfig | None = None,
              router: SuitabilityRouter | None = None, cloud_slots: int = 0,
              freshness: FreshnessConfig | None = None,
              clock: Callable[[], float] = time.monotonic) -> Scheduler:
        """`name` policy over the shipped router (MiniLM loads on the first question);
        `cloud_slots`: streams the cloud model batches (its queue estimate needs it);
        `freshness`: how fast old rate measurements fade (default: half-life 60 s)."""
        router = router or SuitabilityRouter()
        lengths = LengthModel()
        cfg = cfg or PolicyConfig()
        freshness = freshness or FreshnessConfig(
            cloud_prior_tokens_per_s=cfg.cloud_tokens_per_s)
        policy = make_policy(name, cfg, lambda q: float(router.probability([q])[0]), lengths)
        return cls(policy, router, lengths, cloud_slots, freshness, clock)

    def decide(self, q: QueryFeatures, edges: tuple[EdgeState, ...]) -> Decision:
        edges = self.edge_speeds.age(edges, self.clock())
        d = self.policy.decide(q, ClusterState(self.cloud.state(), edges))
        log.info("decision %s (%s): %s", d.mode, d.code, d.reason)
        return d

    def observe_answer(self, q: QueryFeatures, d: Decision, tokens: int) -> None:
        """A full-cloud answer of `tokens` finished: the length model learns from it."""
        if d.probability is not None:
            self.lengths.observe(q.question, d.probability, tokens, q.max_tokens)
