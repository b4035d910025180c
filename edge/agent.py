"""The edge agent (`pice edge`): dials the cloud hub over a WebSocket (the cloud never dials an
edge), registers, heartbeats, runs the batches it is sent on its local workers and streams each
point back the moment it is done. Reconnects with exponential backoff and jitter. SIGTERM drains:
no new work, in-flight batches finish (or are handed back after drain_timeout_s), exit 0.
Tells systemd READY=1 once the models are loaded and WATCHDOG=1 while its event loop runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable

import websockets
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pice.edge.agent_config import AgentConfig
from pice.edge.agent_notify import SystemdNotifier
from pice.edge.expander import EdgeWorker
from pice.shared.aio import iterate_in_thread
from pice.shared.errors import WireFormatError
from pice.shared.protocol import (
    MAX_FRAME_BYTES,
    AgentBatchDone,
    AgentDrain,
    AgentHeartbeat,
    AgentPong,
    AgentRegister,
    AgentResult,
    ExpansionTask,
    HubCancel,
    HubPing,
    HubTasks,
    HubWelcome,
    decode_hub_message,
    encode_message,
)
from pice.shared.sampling import SamplingParams

log = logging.getLogger(__name__)

EXIT_REFUSED = 2  # the cloud refused this agent (bad token, agents off): retrying cannot help


class EdgeAgent:
    def __init__(self, cfg: AgentConfig, workers: dict[str, EdgeWorker],
                 notifier: SystemdNotifier | None = None) -> None:
        assert set(workers) == set(cfg.models), (sorted(workers), cfg.models)
        self.cfg = cfg
        self.workers = workers
        self.notifier = notifier or SystemdNotifier()
        self.tokens_per_s = 0.0
        self._batches: dict[str, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self._send_lock = asyncio.Lock()

    @property
    def inflight(self) -> int:
        return sum(w.inflight for w in self.workers.values())

    def measure(self) -> float:
        """Decode rate of one stream on the first model: a short greedy warm-up generation."""
        gen = next(iter(self.workers.values())).generator
        prompt = gen.render_chat([{"role": "user", "content": "Say something about the sea."}])
        t0 = time.perf_counter()
        [out] = gen.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0))
        self.tokens_per_s = out.completion_tokens / max(time.perf_counter() - t0, 1e-6)
        return self.tokens_per_s

    async def run(self) -> int:
        """Until SIGTERM/SIGINT (exit 0) or a refusal by the cloud (exit EXIT_REFUSED)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        watchdog = asyncio.create_task(self._watchdog())
        self.notifier.notify("READY=1", f"STATUS=edge {self.cfg.edge_id}: connecting")
        attempt = 0
        try:
            while not self._stop.is_set():
                try:
                    async with websockets.connect(
                            self.cfg.cloud, ssl=self.cfg.ssl_context(), max_size=MAX_FRAME_BYTES,
                            open_timeout=self.cfg.connect_timeout_s,
                            additional_headers={"Authorization": f"Bearer {self.cfg.token}"},
                    ) as ws:
                        if await self._session(ws):
                            attempt = 0
                except InvalidStatus as exc:
                    status = exc.response.status_code
                    if status in (401, 403):
                        body = exc.response.body.decode(errors="replace")[:300]
                        log.error("the cloud refused this edge (HTTP %d): %s", status, body)
                        return EXIT_REFUSED
                    log.warning("connect failed: HTTP %d", status)
                except (OSError, TimeoutError, ConnectionClosed, WireFormatError) as exc:
                    log.warning("connection to %s lost or failed: %s", self.cfg.cloud, exc)
                if self._stop.is_set():
                    break
                delay = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** attempt)
                delay *= random.uniform(0.5, 1.0)  # jitter: a fleet does not reconnect in step
                attempt += 1
                self.notifier.notify(f"STATUS=edge {self.cfg.edge_id}: reconnecting in "
                                     f"{delay:.1f}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            return 0
        finally:
            self.notifier.notify("STOPPING=1")
            watchdog.cancel()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("%s: draining", sig.name)
        self._stop.set()

    async def _watchdog(self) -> None:
        """WATCHDOG=1 from the event loop itself, so a stalled loop stops the pings."""
        period = self.notifier.watchdog_s
        if period is None:
            return
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(period)

    async def _send(self, ws: ClientConnection, msg: BaseModel) -> None:
        async with self._send_lock:
            await ws.send(encode_message(msg))

    async def _session(self, ws: ClientConnection) -> bool:
        """One connection: register, then serve until it drops or a drain ends it. True when
        the hub welcomed this agent."""
        await self._send(ws, self.register_message())
        welcome = decode_hub_message(
            await asyncio.wait_for(ws.recv(), self.cfg.connect_timeout_s))
        if not isinstance(welcome, HubWelcome):
            raise WireFormatError(f"expected welcome, got {welcome.type}")
        log.info("registered with %s as %s", self.cfg.cloud, self.cfg.edge_id)
        self.notifier.notify(f"STATUS=edge {self.cfg.edge_id}: connected to {self.cfg.cloud}")
        beats = asyncio.create_task(self._heartbeats(ws, welcome.heartbeat_s))
        receiver = asyncio.create_task(self._receive(ws))
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({receiver, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop.done() and not receiver.done():
                await self._drain(ws)
            elif receiver.done():
                receiver.result()  # re-raise why the connection ended
        finally:
            for t in (beats, receiver, stop, *self._batches.values()):
                t.cancel()  # a lost connection's batches are re-dispatched by the hub
            self._batches.clear()
        return True

    async def _heartbeats(self, ws: ClientConnection, period: float) -> None:
        while True:
            await self._send(ws, AgentHeartbeat(inflight=self.inflight,
                                                tokens_per_s=self.tokens_per_s))
            await asyncio.sleep(period)

    async def _receive(self, ws: ClientConnection) -> None:
        async for frame in ws:
            msg = decode_hub_message(frame)
            if isinstance(msg, HubPing):
                await self._send(ws, AgentPong(seq=msg.seq))
            elif isinstance(msg, HubTasks):
                problem = self._refuse(msg)
                if problem:
                    await self._send(ws, AgentBatchDone(batch_id=msg.batch_id, error=problem))
                else:
                    task = asyncio.create_task(self._run_batch(ws, msg))
                    self._batches[msg.batch_id] = task
                    task.add_done_callback(self._forget(msg.batch_id))
            elif isinstance(msg, HubCancel):
                running = self._batches.pop(msg.batch_id, None)
                if running is not None:
                    running.cancel()
            else:  # edge-group messages (pice.edge.group.agent)
                await self.on_message(ws, msg)

    def register_message(self) -> AgentRegister:
        """The first frame of a session: what this edge offers."""
        adapters = sorted({a.name for w in self.workers.values()
                           for a in w.generator.adapters()})
        return AgentRegister(edge_id=self.cfg.edge_id, models=self.cfg.models,
                             adapters=adapters, slots=self.cfg.slots,
                             tokens_per_s=self.tokens_per_s)

    async def on_message(self, ws: ClientConnection, msg: BaseModel) -> None:
        """A hub message this agent does not handle (group plans: see GroupAgent)."""
        log.warning("ignoring %s from the hub", type(msg).__name__)

    def _forget(self, batch_id: str) -> Callable[[asyncio.Task[None]], None]:
        def forget(_: asyncio.Task[None]) -> None:
            self._batches.pop(batch_id, None)
        return forget

    def _refuse(self, msg: HubTasks) -> str | None:
        if self._stop.is_set():
            return "draining"
        if self.inflight + len(msg.tasks) > self.cfg.slots:
            return f"over capacity: {self.inflight} running + {len(msg.tasks)} > " \
                   f"{self.cfg.slots} slots"
        unknown = {t.model for t in msg.tasks if t.model is not None} - set(self.workers)
        return f"models not served here: {sorted(unknown)}" if unknown else None

    async def _run_batch(self, ws: ClientConnection, msg: HubTasks) -> None:
        groups: dict[str, list[ExpansionTask]] = {}
        for t in msg.tasks:
            groups.setdefault(t.model or self.cfg.models[0], []).append(t)

        async def run(model: str, tasks: list[ExpansionTask]) -> None:
            async for r in iterate_in_thread(self.workers[model].expand_iter(tasks)):
                if r.seconds > 0 and r.tokens > 0:
                    self.tokens_per_s = 0.8 * self.tokens_per_s + 0.2 * r.tokens / r.seconds
                await self._send(ws, AgentResult(batch_id=msg.batch_id, result=r))

        error = None
        try:
            await asyncio.gather(*(run(m, ts) for m, ts in groups.items()))
        except (ConnectionClosed, asyncio.CancelledError):
            raise
        except Exception as exc:  # the model failed: the hub moves the undelivered points
            log.exception("batch %s failed", msg.batch_id)
            error = f"{type(exc).__name__}: {exc}"[:2000]
        await self._send(ws, AgentBatchDone(batch_id=msg.batch_id, error=error))

    async def _drain(self, ws: ClientConnection) -> None:
        """Tell the hub to send nothing more, let running batches finish for up to
        drain_timeout_s, hand back the rest, close."""
        self.notifier.notify("STOPPING=1", f"STATUS=edge {self.cfg.edge_id}: draining")
        await self._send(ws, AgentDrain())
        running = list(self._batches.values())
        if running:
            await asyncio.wait(running, timeout=self.cfg.drain_timeout_s)
        left = [b for b, t in self._batches.items() if not t.done()]
        if left:
            log.warning("drain timeout: handing back %d batch(es)", len(left))
            await self._send(ws, AgentDrain(handed_back=left))
        log.info("drained; closing")
        await ws.close()
