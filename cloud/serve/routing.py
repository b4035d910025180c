"""Prefix/session affinity for the cloud-model deployment: every call that carries the same
`affinity` key (the prompts of one request, or one client session) goes to the same replica,
which holds its prefix in the engine's KV cache; a full replica passes the call to the next one.
Rendezvous hashing keeps keys in place when replicas come and go."""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


def _score(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest(),
                          "big")


def rank(key: str, replicas: list[str]) -> list[str]:
    """Replica ids in the order a key prefers them (highest rendezvous score first)."""
    return sorted(replicas, key=lambda r: _score(key, r), reverse=True)


class AffinityRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None,
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_request.kwargs.get("affinity") if pending_request is not None else None
        if not key:  # no affinity: power of two choices
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ordered = [by_id[i] for i in rank(str(key), list(by_id))]
        # the preferred replica first; when it refuses (full), the rest by queue length
        return [ordered[:1], ordered[1:]] if len(ordered) > 1 else [ordered]
