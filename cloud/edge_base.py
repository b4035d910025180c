"""What the edge pool needs of one edge, in-process or remote: a slot gate (backpressure), running
measurements (token rate, failure rate) and a state snapshot for the scheduler."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from pice.scheduler.placement import PlacementConfig, stream_rate
from pice.scheduler.state import EdgeState
from pice.shared.protocol import ExpansionResult, ExpansionTask

_EWMA = 0.2  # weight of the newest observation in running rates


class EdgeLost(Exception):
    """An edge went away (died, lease expired, drained, failed) before finishing its batch."""


class SlotGate:
    """Free slots that dispatch waits on. Holds no asyncio primitive, so it works across event
    loops (the bench and tests run requests under fresh loops)."""

    def __init__(self, slots: int) -> None:
        assert slots >= 1, slots
        self.slots = slots
        self.inflight = 0  # slots reserved now
        self.closed: str | None = None  # why the edge is gone (None: alive)
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def free(self) -> int:
        return max(0, self.slots - self.inflight)

    async def reserve(self, n: int) -> int:
        """Wait for at least one free slot, then reserve up to `n`; raise EdgeLost if the edge
        goes away first."""
        assert n >= 1, n
        while True:
            if self.closed is not None:
                raise EdgeLost(self.closed)
            if self.free > 0:
                k = min(self.free, n)
                self.inflight += k
                return k
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._waiters:
                    self._waiters.remove(fut)

    def release(self, k: int) -> None:
        assert 0 <= k <= self.inflight, (k, self.inflight)
        self.inflight -= k
        self._wake()

    def close(self, reason: str) -> None:
        """The edge is gone: every waiter (and every later reserve) raises EdgeLost."""
        self.closed = reason
        self._wake()

    def _wake(self) -> None:
        for fut in list(self._waiters):
            loop = fut.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(_set, fut)


def _set(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass(frozen=True)
class DeadlineConfig:
    """How long a remote edge may take over a batch before its points move elsewhere: a floor,
    plus twice the round trip, plus `multiplier` times the expected decode time of the batch's
    largest token budget at the edge's measured per-stream rate with the batch's streams."""

    floor_s: float = 30.0  # never less than this (model warm-up, adapter loads, GC pauses)
    multiplier: float = 4.0  # slack over the expected decode time
    min_tokens_per_s: float = 1.0  # rate assumed when unmeasured or measured lower
    suspect_s: float = 60.0  # an edge that missed a deadline takes no work this long

    def __post_init__(self) -> None:
        if not (self.floor_s > 0 and self.multiplier >= 1 and self.min_tokens_per_s > 0
                and self.suspect_s >= 0):
            raise ValueError(f"deadline config needs floor_s > 0, multiplier >= 1, "
                             f"min_tokens_per_s > 0 and suspect_s >= 0, got {self}")

    def seconds(self, stats: EdgeStats, tasks: list[ExpansionTask]) -> float:
        """The deadline of one batch, from its token budget and the edge's measurements."""
        budget = max(t.max_tokens for t in tasks)
        rate = stream_rate(max(stats.tokens_per_s, self.min_tokens_per_s), len(tasks),
                           PlacementConfig.batch_half)
        return self.floor_s + 2 * stats.rtt_s + self.multiplier * budget / rate


class EdgeStats:
    """Running measurements of one edge (exponentially weighted)."""

    def __init__(self, tokens_per_s: float = 0.0) -> None:
        self.tokens_per_s = tokens_per_s  # decode rate of one stream
        self.rtt_s = 0.0  # cloud↔edge round trip (0 for in-process)
        self.failure_rate = 0.0  # share of recent points that the edge failed to deliver
        self.deadlines_missed = 0  # batches whose deadline ran out on this edge
        self.suspect_until = 0.0  # monotonic time before which it takes no work

    @property
    def suspect(self) -> bool:
        """Missed a deadline recently: placement skips it until the suspicion lapses."""
        return time.monotonic() < self.suspect_until

    def observe_deadline_missed(self, suspect_s: float) -> None:
        self.deadlines_missed += 1
        self.suspect_until = time.monotonic() + suspect_s

    def observe_result(self, r: ExpansionResult) -> None:
        if r.tokens > 0 and r.seconds > 0:
            rate = r.tokens / r.seconds
            self.tokens_per_s = rate if self.tokens_per_s == 0 else (
                (1 - _EWMA) * self.tokens_per_s + _EWMA * rate)
        self.failure_rate *= 1 - _EWMA

    def observe_failures(self, points: int) -> None:
        for _ in range(points):
            self.failure_rate = (1 - _EWMA) * self.failure_rate + _EWMA

    def observe_rtt(self, seconds: float) -> None:
        self.rtt_s = seconds if self.rtt_s == 0 else (1 - _EWMA) * self.rtt_s + _EWMA * seconds


class Edge(Protocol):
    """One edge as the pool sees it."""

    edge_id: str
    gate: SlotGate
    stats: EdgeStats

    def state(self) -> EdgeState:
        """Snapshot for the scheduler (slots, inflight, rates, adapters, health)."""
        ...

    def accepts(self, task: ExpansionTask) -> bool:
        """Whether this edge runs the task's model and adapter."""
        ...

    def run(self, tasks: list[ExpansionTask]) -> AsyncIterator[ExpansionResult]:
        """Run the tasks as one batch, yielding each result as it arrives; raise when the edge
        fails (the caller holds one slot per task and releases them)."""
        ...
