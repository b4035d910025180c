"""What the cloud needs of an edge worker, in-process or across the network."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from pice.shared.protocol import ExpansionResult, ExpansionTask

CLOUD_WORKER_ID = "cloud"  # worker id of the cloud model when it expands points itself


class ExpansionWorker(Protocol):
    worker_id: str
    inflight: int  # tasks running on it now (placement reads it)

    def expand(self, tasks: list[ExpansionTask]) -> list[ExpansionResult]:
        """Expand every task as one batch; results in task order."""
        ...

    def expand_iter(self, tasks: list[ExpansionTask]) -> Iterator[ExpansionResult]:
        """The same batch, yielding each result as soon as its point is done."""
        ...
