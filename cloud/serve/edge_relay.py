"""Edges across gateway replicas. `ClusterHub` is the replica's edge hub plus `RelayEdge`s: the
agents connected to other replicas, seen through the registry actor. A relayed batch is posted to
the holder's mailbox; the holder runs it on the agent (reserving the agent's real slots, so the
agent never gets more than it offered) and pushes each result back as it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from pice.cloud.edge_base import EdgeLost
from pice.cloud.edge_hub import EdgeHub, RemoteEdge
from pice.cloud.edge_tokens import EdgeTokenStore
from pice.cloud.serve.registry import END, LOST
from pice.shared.protocol import AgentRegister, ExpansionResult, ExpansionTask

log = logging.getLogger(__name__)

POLL_S = 5.0  # long-poll window of mailbox and result calls


class RelayEdge(RemoteEdge):
    """An agent held by another gateway replica."""

    def __init__(self, holder: str, info: dict[str, Any], registry: Any) -> None:
        reg = AgentRegister(edge_id=info["edge_id"], models=info["models"],
                            adapters=info["adapters"], slots=info["slots"],
                            tokens_per_s=info["tokens_per_s"])
        super().__init__(reg, token_id=f"via:{holder}", conn=None)  # type: ignore[arg-type]
        self.holder = holder
        self.registry = registry
        self.update(holder, info)

    def update(self, holder: str, info: dict[str, Any]) -> None:
        self.holder = holder
        self.models = tuple(info["models"])
        self.adapters = frozenset(info["adapters"])
        self.stats.rtt_s = info["rtt_s"]
        if info["tokens_per_s"]:
            self.stats.tokens_per_s = info["tokens_per_s"]
        self.draining = not info["healthy"]

    async def run(self, tasks: list[ExpansionTask]) -> AsyncIterator[ExpansionResult]:
        if self.gate.closed is not None:
            raise EdgeLost(self.gate.closed)
        body = json.dumps([t.model_dump(mode="json") for t in tasks])
        try:
            call_id = await self.registry.submit.remote(self.holder, self.edge_id, body)
        except Exception as exc:  # the registry is restarting
            raise EdgeLost(f"edge registry unavailable: {exc}") from exc
        done = False
        try:
            while not done:
                try:
                    items = await self.registry.results.remote(call_id, POLL_S)
                except Exception as exc:
                    raise EdgeLost(f"edge registry unavailable: {exc}") from exc
                for item in items:
                    if item == END:
                        done = True
                    elif item.startswith(LOST):
                        raise EdgeLost(item[len(LOST):])
                    else:
                        yield ExpansionResult.model_validate_json(item)
        finally:
            if not done:
                with contextlib.suppress(Exception):
                    await self.registry.cancel.remote(call_id)


def _view(edge: RemoteEdge) -> dict[str, Any]:
    s = edge.state()
    return {"edge_id": s.edge_id, "models": list(s.models), "adapters": sorted(s.adapters),
            "slots": s.slots, "tokens_per_s": s.tokens_per_s, "rtt_s": s.rtt_s,
            "healthy": s.healthy}


class ClusterHub(EdgeHub):
    """This replica's agents, plus the other replicas' agents as relay edges."""

    def __init__(self, tokens: EdgeTokenStore, heartbeat_s: float, lease_s: float,
                 registry: Any, replica: str) -> None:
        super().__init__(tokens, heartbeat_s, lease_s)
        self.registry = registry
        self.replica = replica
        self.relays: dict[str, RelayEdge] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def edges(self) -> list[RemoteEdge]:
        local = super().edges()
        ids = {e.edge_id for e in local}
        return [*local, *(r for r in self.relays.values() if r.edge_id not in ids)]

    def start(self) -> None:
        """Publish and mailbox loops, on the running event loop."""
        for loop in (self._publish_loop(), self._mailbox_loop()):
            task = asyncio.get_running_loop().create_task(loop)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _publish_loop(self) -> None:
        while True:
            try:
                mine = json.dumps([_view(e) for e in super().edges()])
                others = json.loads(await self.registry.publish.remote(self.replica, mine))
                self._refresh(others)
            except Exception as exc:  # registry restarting: keep the last view a while
                log.warning("edge registry publish failed: %s", exc)
            await asyncio.sleep(self.heartbeat_s)

    def _refresh(self, others: list[dict[str, Any]]) -> None:
        seen = set()
        for entry in others:
            info, holder = entry["edge"], entry["replica"]
            seen.add(info["edge_id"])
            relay = self.relays.get(info["edge_id"])
            if relay is None or relay.gate.closed is not None:
                self.relays[info["edge_id"]] = RelayEdge(holder, info, self.registry)
            else:
                relay.update(holder, info)
        for gone in set(self.relays) - seen:
            self.relays.pop(gone).lose("the gateway replica holding it no longer lists it")

    async def _mailbox_loop(self) -> None:
        while True:
            try:
                calls = await self.registry.take.remote(self.replica, POLL_S)
            except Exception as exc:
                log.warning("edge registry take failed: %s", exc)
                await asyncio.sleep(self.heartbeat_s)
                continue
            for call_id, edge_id, tasks_json in calls:
                task = asyncio.get_running_loop().create_task(
                    self._serve_call(call_id, edge_id, tasks_json))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _serve_call(self, call_id: str, edge_id: str, tasks_json: str) -> None:
        """Run another replica's batch on an agent held here; results go back one by one."""
        tasks = [ExpansionTask.model_validate(t) for t in json.loads(tasks_json)]
        edge = next((e for e in super().edges() if e.edge_id == edge_id), None)
        if edge is None:
            await self.registry.put.remote(call_id, [f"{LOST}edge {edge_id} is not connected "
                                                     f"to replica {self.replica}"])
            return
        held = 0
        try:
            while held < len(tasks):  # the agent's own slots: it never gets more than offered
                held += await edge.gate.reserve(len(tasks) - held)
            async for r in edge.run(tasks):
                edge.gate.release(1)
                held -= 1
                edge.stats.observe_result(r)
                if not await self.registry.put.remote(call_id, [r.model_dump_json()]):
                    return  # the caller left
            await self.registry.put.remote(call_id, [END])
        except Exception as exc:
            with contextlib.suppress(Exception):
                await self.registry.put.remote(call_id, [f"{LOST}{type(exc).__name__}: {exc}"])
        finally:
            edge.gate.release(held)
