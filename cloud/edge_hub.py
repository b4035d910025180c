"""The cloud's registry of remote edge agents. Each agent holds one WebSocket it dialled; the hub
keeps its lease (any frame renews it), pings it for the round-trip time, sends it batches within
its slots and routes its results back. An agent whose lease runs out, whose connection drops or
whose token is revoked is declared dead: its batches fail at once, so the pool moves their points
to another edge (or the cloud). Results that arrive for a batch no longer open are dropped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from pice.cloud.edge_base import EdgeLost, EdgeStats, SlotGate
from pice.cloud.edge_groups import GroupRegistry
from pice.cloud.edge_pool import ResultKey, result_key
from pice.cloud.edge_tokens import EdgeTokenStore, TokenRecord
from pice.scheduler.state import EdgeState
from pice.shared.errors import WireFormatError
from pice.shared.protocol import (
    AGENT_PROTOCOL_VERSION,
    AgentBatchDone,
    AgentDrain,
    AgentGroupReady,
    AgentHeartbeat,
    AgentPong,
    AgentRegister,
    AgentResult,
    ExpansionResult,
    ExpansionTask,
    HubCancel,
    HubGroupPlan,
    HubPing,
    HubTasks,
    HubWelcome,
    decode_agent_message,
    encode_message,
)

log = logging.getLogger(__name__)

POLICY_VIOLATION = 1008  # WebSocket close codes
GOING_AWAY = 1001


class Connection(Protocol):
    """The part of a WebSocket the hub uses (starlette's WebSocket fits)."""

    async def receive_text(self) -> str: ...
    async def send_text(self, data: str) -> None: ...
    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


@dataclass
class _Batch:
    keys: set[ResultKey]  # points not delivered yet
    queue: asyncio.Queue[ExpansionResult | str] = field(default_factory=asyncio.Queue)


class RemoteEdge:
    """One registered agent, as the pool sees it."""

    def __init__(self, reg: AgentRegister, token_id: str, conn: Connection) -> None:
        self.edge_id = reg.edge_id
        self.models = tuple(reg.models)
        self.adapters = frozenset(reg.adapters)
        self.token_id = token_id
        self.gate = SlotGate(reg.slots)
        self.stats = EdgeStats(reg.tokens_per_s)
        self.conn = conn
        self.draining = False
        self.connected_at = time.time()
        self.last_seen = time.monotonic()
        self.agent_inflight = 0  # as the agent last reported it
        self.batches: dict[str, _Batch] = {}
        self.pings: dict[int, float] = {}  # ping seq → when it was sent (monotonic)
        self._send_lock = asyncio.Lock()
        self.group = reg.group.name if reg.group is not None else None  # edge group it is in
        self.group_ok: Callable[[], bool] = lambda: True  # its group serves with it as head

    def state(self) -> EdgeState:
        return EdgeState(self.edge_id, self.models, self.gate.slots, self.gate.inflight,
                         self.stats.tokens_per_s, self.stats.rtt_s, self.adapters,
                         healthy=(self.gate.closed is None and not self.draining
                                  and not self.stats.suspect and self.group_ok()),
                         failure_rate=self.stats.failure_rate)

    def accepts(self, task: ExpansionTask) -> bool:
        return ((task.model is None or task.model in self.models)
                and (task.adapter is None or task.adapter in self.adapters))

    async def send(self, msg: HubTasks | HubPing | HubCancel | HubWelcome | HubGroupPlan,
                   ) -> None:
        async with self._send_lock:
            await self.conn.send_text(encode_message(msg))

    async def run(self, tasks: list[ExpansionTask]) -> AsyncIterator[ExpansionResult]:
        if self.gate.closed is not None:
            raise EdgeLost(self.gate.closed)
        batch_id = uuid.uuid4().hex
        batch = _Batch({result_key(t) for t in tasks})
        self.batches[batch_id] = batch
        try:
            try:
                await self.send(HubTasks(batch_id=batch_id, tasks=tasks))
            except Exception as exc:
                raise EdgeLost(f"send failed: {exc}") from exc
            while batch.keys:
                item = await batch.queue.get()
                if isinstance(item, str):
                    raise EdgeLost(item)
                batch.keys.discard(result_key(item))
                yield item
        finally:
            self.batches.pop(batch_id, None)
            if batch.keys and self.gate.closed is None:  # ended early: the agent may stop
                with contextlib.suppress(Exception):
                    await self.send(HubCancel(batch_id=batch_id))

    def deliver(self, batch_id: str, result: ExpansionResult) -> None:
        batch = self.batches.get(batch_id)
        if batch is None or result_key(result) not in batch.keys:
            log.info("edge %s: dropped stale result %s of batch %s", self.edge_id,
                     result_key(result), batch_id)
            return
        batch.queue.put_nowait(result.model_copy(update={"worker": self.edge_id}))

    def fail_batch(self, batch_id: str, reason: str) -> None:
        batch = self.batches.get(batch_id)
        if batch is not None:
            batch.queue.put_nowait(reason)

    def lose(self, reason: str) -> None:
        """Declared dead: waiting dispatches and open batches fail now."""
        self.gate.close(reason)
        for batch_id in list(self.batches):
            self.fail_batch(batch_id, reason)


class EdgeHub:
    def __init__(self, tokens: EdgeTokenStore, heartbeat_s: float = 2.0,
                 lease_s: float = 6.0) -> None:
        assert lease_s > heartbeat_s > 0, (heartbeat_s, lease_s)
        self.tokens = tokens
        self.heartbeat_s = heartbeat_s
        self.lease_s = lease_s
        self._edges: dict[str, RemoteEdge] = {}
        self.groups = GroupRegistry()  # edge groups (`pice edge --group`)

    def edges(self) -> list[RemoteEdge]:
        """Every agent the pool may use: a group shows as its first stage only."""
        return [e for e in self._edges.values() if self.groups.visible(e)]

    def authenticate(self, authorization: str | None) -> TokenRecord | None:
        """The token record of an `Authorization: Bearer <token>` header, or None."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return self.tokens.verify(token.strip())

    async def serve(self, conn: Connection, record: TokenRecord) -> None:
        """One agent's session, from its register frame until it is gone."""
        try:
            reg = decode_agent_message(await asyncio.wait_for(conn.receive_text(), self.lease_s))
        except (TimeoutError, WireFormatError) as exc:
            await _close(conn, POLICY_VIOLATION, f"expected a register frame: {exc}")
            return
        problem = _check_register(reg, record)
        if problem or not isinstance(reg, AgentRegister):
            await _close(conn, POLICY_VIOLATION, problem or "expected a register frame")
            return
        old = self._edges.get(reg.edge_id)
        if old is not None:  # the agent restarted before its old lease ran out
            old.lose("replaced by a new connection of the same edge")
            await _close(old.conn, GOING_AWAY, "replaced by a new connection")
        edge = RemoteEdge(reg, record.token_id, conn)
        self._edges[edge.edge_id] = edge
        if reg.group is not None:
            edge.group_ok = lambda: self.groups.healthy(edge)
            self.groups.join(edge, reg.group, reg.models[0])
        log.info("edge %s registered: models=%s slots=%d tokens/s=%.1f", edge.edge_id,
                 list(edge.models), reg.slots, reg.tokens_per_s)
        pinger = asyncio.create_task(self._ping(edge))
        reason = "disconnected"
        code = 1000
        try:
            await edge.send(HubWelcome(heartbeat_s=self.heartbeat_s, lease_s=self.lease_s))
            while True:
                try:
                    frame = await asyncio.wait_for(conn.receive_text(), self.lease_s)
                except TimeoutError:
                    reason, code = f"lease expired: silent for {self.lease_s:g}s", GOING_AWAY
                    break
                edge.last_seen = time.monotonic()
                problem = self._handle(edge, decode_agent_message(frame))
                if problem:
                    reason, code = problem, POLICY_VIOLATION
                    break
        except WireFormatError as exc:
            reason, code = exc.message, POLICY_VIOLATION
        except Exception as exc:  # the connection dropped (starlette WebSocketDisconnect, …)
            reason = f"disconnected ({type(exc).__name__})"
        finally:
            pinger.cancel()
            edge.lose(reason)
            self.groups.leave(edge, reason)
            if self._edges.get(edge.edge_id) is edge:
                del self._edges[edge.edge_id]
            log.warning("edge %s gone: %s", edge.edge_id, reason)
            await _close(conn, code, reason)

    def _handle(self, edge: RemoteEdge, msg: object) -> str | None:
        """Apply one agent frame; a reason to drop the agent, or None."""
        if isinstance(msg, AgentResult):
            edge.deliver(msg.batch_id, msg.result)
        elif isinstance(msg, AgentBatchDone):
            batch = edge.batches.get(msg.batch_id)
            if batch is not None and (msg.error or batch.keys):
                edge.fail_batch(msg.batch_id, msg.error or "batch ended with points missing")
        elif isinstance(msg, AgentPong):
            sent = edge.pings.pop(msg.seq, None)
            if sent is not None:
                edge.stats.observe_rtt(time.monotonic() - sent)
        elif isinstance(msg, AgentHeartbeat):
            edge.agent_inflight = msg.inflight
            if edge.stats.tokens_per_s == 0:
                edge.stats.tokens_per_s = msg.tokens_per_s
            if not self.tokens.is_active(edge.token_id):
                return "token revoked"
        elif isinstance(msg, AgentGroupReady):
            self.groups.on_ready(edge, msg)
        elif isinstance(msg, AgentDrain):
            edge.draining = True
            for batch_id in msg.handed_back:
                edge.fail_batch(batch_id, "handed back by a draining agent")
        else:
            return f"unexpected {type(msg).__name__} frame"
        return None

    async def _ping(self, edge: RemoteEdge) -> None:
        seq = 0
        while True:
            await asyncio.sleep(self.heartbeat_s)
            seq += 1
            edge.pings = {s: t for s, t in edge.pings.items() if s > seq - 8}
            edge.pings[seq] = time.monotonic()
            try:
                await edge.send(HubPing(seq=seq))
            except Exception:
                return


def _check_register(reg: object, record: TokenRecord) -> str | None:
    if not isinstance(reg, AgentRegister):
        return f"expected a register frame, got {type(reg).__name__}"
    if reg.version != AGENT_PROTOCOL_VERSION:
        return f"protocol version {reg.version} not supported (hub speaks " \
               f"{AGENT_PROTOCOL_VERSION})"
    if reg.edge_id != record.edge_id:
        return f"edge id {reg.edge_id!r} does not match its token's edge {record.edge_id!r}"
    return None


async def _close(conn: Connection, code: int, reason: str) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.close(code=code, reason=reason[:120]), 5)
