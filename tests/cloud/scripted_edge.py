"""A scripted edge agent for tests: a real WebSocket client that speaks the real agent protocol
(register, heartbeats, pongs) from its own thread and event loop, and either expands the points
it is sent with a real tiny model or never answers them (an edge that is alive but stalled)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import websockets

from pice.edge.expander import EdgeWorker
from pice.shared.protocol import (
    AgentBatchDone,
    AgentHeartbeat,
    AgentPong,
    AgentRegister,
    AgentResult,
    HubCancel,
    HubPing,
    HubTasks,
    HubWelcome,
    decode_hub_message,
    encode_message,
)
from tests.edge.agent_procs import WAIT_S


class ScriptedEdge:
    """`worker=None`: heartbeats and pongs forever but never returns a result."""

    def __init__(self, ws_url: str, token: str, edge_id: str, model: str,
                 worker: EdgeWorker | None = None, tokens_per_s: float = 0.0,
                 slots: int = 8) -> None:
        self.ws_url, self.token, self.edge_id, self.model = ws_url, token, edge_id, model
        self.worker = worker
        self.tokens_per_s = tokens_per_s
        self.slots = slots
        self.batches: list[HubTasks] = []  # every batch it was sent
        self.cancelled: list[str] = []  # batch ids the hub cancelled
        self.welcomed = threading.Event()
        self.error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def __enter__(self) -> ScriptedEdge:
        self._thread.start()
        if not self.welcomed.wait(WAIT_S):
            raise AssertionError(f"{self.edge_id} was not welcomed: {self.error!r}")
        return self

    def __exit__(self, *_: Any) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(WAIT_S)

    def _main(self) -> None:
        try:
            asyncio.run(self._session())
        except BaseException as exc:  # shown by __enter__ or the test
            self.error = exc
            self.welcomed.set()

    async def _session(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        headers = {"Authorization": f"Bearer {self.token}"}
        async with websockets.connect(self.ws_url, additional_headers=headers,
                                      max_size=None) as ws:
            await ws.send(encode_message(AgentRegister(
                edge_id=self.edge_id, models=[self.model], slots=self.slots,
                tokens_per_s=self.tokens_per_s)))
            assert isinstance(decode_hub_message(await ws.recv()), HubWelcome)
            self.welcomed.set()
            tasks = [asyncio.create_task(self._beats(ws)), asyncio.create_task(self._recv(ws))]
            await self._stop.wait()
            for t in tasks:
                t.cancel()
            with contextlib.suppress(Exception):
                await ws.close()

    async def _beats(self, ws: Any) -> None:
        while True:
            await ws.send(encode_message(AgentHeartbeat(inflight=0,
                                                        tokens_per_s=self.tokens_per_s)))
            await asyncio.sleep(0.5)

    async def _recv(self, ws: Any) -> None:
        async for frame in ws:
            msg = decode_hub_message(frame)
            if isinstance(msg, HubPing):
                await ws.send(encode_message(AgentPong(seq=msg.seq)))
            elif isinstance(msg, HubTasks):
                self.batches.append(msg)
                if self.worker is not None:
                    await self._answer(ws, msg)
            elif isinstance(msg, HubCancel):
                self.cancelled.append(msg.batch_id)

    async def _answer(self, ws: Any, msg: HubTasks) -> None:
        assert self.worker is not None
        worker = self.worker
        results = await asyncio.to_thread(lambda: list(worker.expand_iter(msg.tasks)))
        for r in results:
            await ws.send(encode_message(AgentResult(batch_id=msg.batch_id, result=r)))
        await ws.send(encode_message(AgentBatchDone(batch_id=msg.batch_id)))
