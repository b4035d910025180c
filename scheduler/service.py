"""What a server holds of the scheduler: one policy, the router and length model it reads (loaded
once), and the cloud measurements the pipeline reports (queue depth, decode rate)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from pice.scheduler.length import LengthModel
from pice.scheduler.policy import Decision, Policy, PolicyConfig, QueryFeatures, make_policy
from pice.scheduler.router import SuitabilityRouter
from pice.scheduler.state import CloudState, ClusterState, EdgeState

log = logging.getLogger(__name__)


@dataclass
class CloudMeter:
    """Requests on the cloud model now, and an exponential mean of its measured decode rate."""

    queue_depth: int = 0
    batch_depth: int = 0
    tokens_per_s: float = 0.0
    slots: int = 0  # streams the cloud model decodes at once (0: unknown → no queue estimate)
    alpha: float = 0.2  # weight of the newest measurement

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
            self.tokens_per_s = rate if self.tokens_per_s == 0 else \
                (1 - self.alpha) * self.tokens_per_s + self.alpha * rate

    def state(self) -> CloudState:
        return CloudState(self.queue_depth, self.tokens_per_s, self.slots, self.batch_depth)


class Scheduler:
    def __init__(self, policy: Policy, router: SuitabilityRouter | None,
                 lengths: LengthModel, cloud_slots: int = 0) -> None:
        self.policy = policy
        self.router = router
        self.lengths = lengths
        self.cloud = CloudMeter(slots=cloud_slots)

    @classmethod
    def build(cls, name: str = "dynamic", cfg: PolicyConfig | None = None,
              router: SuitabilityRouter | None = None, cloud_slots: int = 0) -> Scheduler:
        """`name` policy over the shipped router (MiniLM loads on the first question);
        `cloud_slots`: streams the cloud model batches (its queue estimate needs it)."""
        router = router or SuitabilityRouter()
        lengths = LengthModel()
        policy = make_policy(name, cfg, lambda q: float(router.probability([q])[0]), lengths)
        return cls(policy, router, lengths, cloud_slots)

    def decide(self, q: QueryFeatures, edges: tuple[EdgeState, ...]) -> Decision:
        d = self.policy.decide(q, ClusterState(self.cloud.state(), edges))
        log.info("decision %s (%s): %s", d.mode, d.code, d.reason)
        return d

    def observe_answer(self, q: QueryFeatures, d: Decision, tokens: int) -> None:
        """A full-cloud answer of `tokens` finished: the length model learns from it."""
        if d.probability is not None:
            self.lengths.observe(q.question, d.probability, tokens, q.max_tokens)
