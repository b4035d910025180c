"""The cloud's view of its edge workers: which are up, and which one takes a batch. In-process
for now; the edge-agent transport plugs in behind the same `dispatch`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from pice.shared.aio import iterate_in_thread
from pice.shared.protocol import ExpansionResult, ExpansionTask
from pice.shared.worker import ExpansionWorker


class EdgePool:
    def __init__(self, workers: Sequence[ExpansionWorker]) -> None:
        self.workers = list(workers)

    @property
    def available(self) -> int:
        return len(self.workers)

    def pick(self) -> ExpansionWorker:
        """Least-loaded worker; ties go to the first listed."""
        assert self.workers, "dispatch with no edge worker"
        return min(self.workers, key=lambda w: w.inflight)

    async def dispatch(self, tasks: list[ExpansionTask]) -> AsyncIterator[ExpansionResult]:
        """All points of one answer go to one worker as one batch (the batch is the unit of
        semantic-level parallelism); each result arrives as soon as its point is done."""
        worker = self.pick()
        async for result in iterate_in_thread(worker.expand_iter(tasks)):
            yield result
