"""What the cloud needs of an edge worker, in-process or across the network."""

from __future__ import annotations

from typing import Protocol

from pice.shared.protocol import ExpansionResult, ExpansionTask


class ExpansionWorker(Protocol):
    worker_id: str
    inflight: int  # tasks running on it now (placement reads it)

    def expand(self, tasks: list[ExpansionTask]) -> list[ExpansionResult]:
        """Expand every task as one batch; results in task order."""
        ...
