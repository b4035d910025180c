"""What the scheduler sees of the system when it decides: plain, immutable snapshots. The cloud
pipeline (and the edge hub for remote agents) fills them from measurements; the simulator fills
them from its own model of the cluster. No I/O, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass(frozen=True)
class ClusterState:
    cloud: CloudState = field(default_factory=CloudState)
    edges: tuple[EdgeState, ...] = ()

    @property
    def free_edge_slots(self) -> int:
        return sum(e.free for e in self.edges)
