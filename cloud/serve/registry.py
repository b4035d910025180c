"""The edge registry: one named Ray actor that every gateway replica talks to. Each replica
publishes the agents connected to it (every heartbeat) and learns the others'; a replica that
wants points run on an agent held by another replica posts the call to that replica's mailbox
here and long-polls its results, which the holder pushes as the agent sends them.

Why a registry actor and not a hub deployment: agents keep their WebSocket on whichever gateway
replica the proxy gave them (no second ingress, no sticky routing for agents), the gateway keeps
one code path for local and remote points, and the actor holds only soft state (rebuilt from the
next heartbeat if it restarts). Everything crossing it is JSON text."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from typing import Any

import ray

NAME = "pice-edge-registry"
NAMESPACE = "pice"
LOST = "lost:"  # result item prefix: the call failed (reason follows)
END = "end"  # result item: the call finished


class EdgeRegistry:
    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.replicas: dict[str, tuple[float, list[dict[str, Any]]]] = {}  # id → (seen, edges)
        self.mailboxes: dict[str, asyncio.Queue[tuple[str, str, str]]] = defaultdict(
            asyncio.Queue)
        self.calls: dict[str, tuple[str, asyncio.Queue[str]]] = {}  # call id → (holder, items)

    def _live(self, replica: str) -> bool:
        seen = self.replicas.get(replica)
        return seen is not None and time.monotonic() - seen[0] < self.lease_s

    async def publish(self, replica: str, edges_json: str) -> str:
        """Store a replica's agents (JSON list of edge states); answer every other live
        replica's agents as JSON [{"replica": …, "edge": {…}}, …]."""
        self.replicas[replica] = (time.monotonic(), json.loads(edges_json))
        for gone in [r for r in self.replicas if not self._live(r)]:
            del self.replicas[gone]
            for call_id, (holder, items) in list(self.calls.items()):
                if holder == gone:
                    items.put_nowait(f"{LOST}gateway replica {gone} holding the edge is gone")
                    del self.calls[call_id]
        return json.dumps([{"replica": r, "edge": e} for r, (_, edges) in self.replicas.items()
                           if r != replica for e in edges])

    async def submit(self, holder: str, edge_id: str, tasks_json: str) -> str:
        call_id = uuid.uuid4().hex
        items: asyncio.Queue[str] = asyncio.Queue()
        self.calls[call_id] = (holder, items)
        if not self._live(holder):
            items.put_nowait(f"{LOST}gateway replica {holder} is not live")
        else:
            self.mailboxes[holder].put_nowait((call_id, edge_id, tasks_json))
        return call_id

    async def take(self, replica: str, timeout_s: float) -> list[tuple[str, str, str]]:
        """Calls for this replica's agents (waits up to timeout_s for the first)."""
        box = self.mailboxes[replica]
        try:
            first = await asyncio.wait_for(box.get(), timeout_s)
        except TimeoutError:
            return []
        out = [first]
        while not box.empty():
            out.append(box.get_nowait())
        return out

    async def put(self, call_id: str, items: list[str]) -> bool:
        """Results (ExpansionResult JSON), then END or LOST…; False once the caller left."""
        call = self.calls.get(call_id)
        if call is None:
            return False
        for item in items:
            call[1].put_nowait(item)
        return True

    async def results(self, call_id: str, timeout_s: float) -> list[str]:
        call = self.calls.get(call_id)
        if call is None:
            return [f"{LOST}unknown call (the registry restarted)"]
        queue = call[1]
        try:
            out = [await asyncio.wait_for(queue.get(), timeout_s)]
        except TimeoutError:
            return []
        while not queue.empty():
            out.append(queue.get_nowait())
        if any(i == END or i.startswith(LOST) for i in out):
            self.calls.pop(call_id, None)
        return out

    async def cancel(self, call_id: str) -> None:
        self.calls.pop(call_id, None)

    async def snapshot(self) -> str:
        """Every live replica's agents: {replica: [edge ids]} (tests and operators)."""
        return json.dumps({r: [e["edge_id"] for e in edges]
                           for r, (_, edges) in self.replicas.items() if self._live(r)})


def get_registry(lease_s: float) -> Any:
    """The cluster's registry, created by the first caller (detached: outlives any replica)."""
    actor: Any = ray.remote(EdgeRegistry)
    return actor.options(name=NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                         num_cpus=0, max_restarts=-1, max_concurrency=10_000).remote(lease_s)
