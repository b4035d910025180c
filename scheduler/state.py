"""What the scheduler sees of the system when it decides: plain, immutable snapshots. The cloud
pipeline (and the edge hub for remote agents) fills them from measurements; the simulator fills
them from its own model of the cluster. No I/O, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pice.scheduler.placement import EdgeIndex


@dataclass(frozen=True)
class EdgeState:
    edge_id: str
    models: tuple[str, ...]  # model specs this edge runs
    slots: int  # points it may run at once (backpressure: never more)
    inflight: int = 0  # points running on it now
    tokens_per_s: float = 0.0  # measured decode rate of one stream (0: not measured yet)
    rtt_s: float = 0.0  # measured cloud↔edge round-trip time
    adapters: frozenset[str] = field(default_factory=frozenset)  # resident LoRA adapters
    healthy: bool = True  # lease current (remote agents) / worker alive
    failure_rate: float = 0.0  # recent share of failed points, 0..1 (slow/failing → less work)

    @property
    def free(self) -> int:
        return max(0, self.slots - self.inflight) if self.healthy else 0


@dataclass(frozen=True)
class CloudState:
    queue_depth: int = 0  # requests waiting for or running on the cloud model
    tokens_per_s: float = 0.0  # measured cloud decode rate of one stream (0: not measured yet)
    slots: int = 0  # streams the cloud decodes at once; more wait in its queue (0: unknown)
    batch_depth: int = 0  # of queue_depth, batch-priority requests (interactive ones go first)


@dataclass(frozen=True)
class ClusterState:
    cloud: CloudState = field(default_factory=CloudState)
    edges: tuple[EdgeState, ...] = ()
    # a live index over the same edges, kept up to date by its owner (the simulator at 10,000
    # edges); None → the policy indexes `edges` itself for this one decision
    index: EdgeIndex | None = None

    @property
    def free_edge_slots(self) -> int:
        if self.index is not None:
            return self.index.free_slots
        return sum(e.free for e in self.edges)

    @property
    def healthy_edges(self) -> int:
        if self.index is not None:
            return self.index.healthy
        return sum(1 for e in self.edges if e.healthy)
