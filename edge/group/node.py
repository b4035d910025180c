"""One member of an edge group at run time: a listener for its previous stage, a connection to
its next stage, and one compute thread that applies frames in order. The first stage also holds
the Driver (requests, sampling results, stops, replay). `configure` takes a new plan (epoch):
the node loads its layer range (if it changed), drops every K/V, dials its next stage and, on the
first stage, replays the unfinished sequences. A broken link stops the pipeline until the next
plan arrives; frames of older epochs are dropped."""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from pice.edge.group import wire
from pice.edge.group.driver import Driver, GroupSeq
from pice.edge.group.links import CONNECT_DEADLINE_S, Links, StageConfig
from pice.edge.group.stage_model import StagePart
from pice.shared.errors import BadRequestError
from pice.shared.sampling import SamplingParams

log = logging.getLogger(__name__)

class StageNode(Links):
    def __init__(self, host: str = "127.0.0.1", port: int = 0, cpu_kernels: bool = True,
                 eos_ids: set[int] | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> None:
        self.listener = socket.create_server((host, port))
        self.addr = f"{host}:{self.listener.getsockname()[1]}"
        self.cpu_kernels = cpu_kernels
        self.eos_ids, self.decode = eos_ids or set(), decode
        self.end_ids = tuple(sorted(self.eos_ids))  # masked on the last stage under min_tokens
        self.events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.latest: StageConfig | None = None  # newest plan received (the accept side checks it)
        self.cfg: StageConfig | None = None  # plan in force in the compute thread
        self.part: StagePart | None = None
        self.driver: Driver | None = None
        self.out: socket.socket | None = None
        self.broken: str | None = "not configured"
        self.ready_epoch = -1  # newest plan this node has applied (range loaded, next dialled)
        self.failed: tuple[int, str] = (-1, "")  # newest plan it could not apply, and why
        self._cond = threading.Condition()
        self.busy_s = 0.0  # compute time (bubble fraction = 1 - busy / wall)
        self.started = time.perf_counter()
        self.stats: dict[str, float] = {"frames_in": 0, "frames_out": 0, "bytes_out": 0}
        for target in (self._accept_loop, self._compute_loop):
            threading.Thread(target=target, daemon=True, name=f"group-{target.__name__}").start()

    # ---- control (any thread) -------------------------------------------------------------
    def configure(self, cfg: StageConfig) -> None:
        with self._cond:
            self.latest = cfg
            self._cond.notify_all()
        self.events.put(("configure", cfg))

    def wait_ready(self, epoch: int, timeout: float = 2 * CONNECT_DEADLINE_S) -> str | None:
        """Block until the plan `epoch` (or a newer one) is applied here: None, or why not."""
        with self._cond:
            self._cond.wait_for(lambda: max(self.ready_epoch, self.failed[0]) >= epoch,
                                timeout=timeout)
            if self.ready_epoch >= epoch:
                return None
            return self.failed[1] if self.failed[0] >= epoch else f"plan {epoch} not applied " \
                f"within {timeout:g}s"

    def submit(self, prompt: list[int], params: SamplingParams,
               on_done: Callable[[GroupSeq], None] | None = None) -> GroupSeq:
        """First stage only: queue a request (admission errors raise here)."""
        driver = self.driver
        if driver is None:
            raise RuntimeError("this member is not the first stage of a configured group")
        vocab = self.part.model.vocab_size if self.part is not None else None
        if vocab is not None and any(not 0 <= t < vocab for t in prompt):
            raise BadRequestError(f"prompt token ids must be in [0, {vocab})", field="prompt")
        seq = driver.new_seq(prompt, params, on_done)
        self.events.put(("submit", seq))
        return seq

    def abort(self, seq: GroupSeq) -> None:
        self.events.put(("abort", seq.seq_id))

    def disband(self, reason: str) -> None:
        """The group leaves: fail every request and stop the pipeline."""
        self.events.put(("disband", reason))

    # ---- the compute thread -----------------------------------------------------------------
    def _compute_loop(self) -> None:
        backlog: deque[tuple[Any, ...]] = deque()
        while True:
            idle = not backlog and not (self.driver and self.broken is None
                                         and self.driver.has_work)
            if idle:
                backlog.append(self.events.get())
            while not self.events.empty():
                backlog.append(self.events.get_nowait())
            if backlog:
                ev = backlog.popleft()
                if ev[0] == "frame" and ev[2].kind == wire.FORWARD:
                    frames = [ev[2]]  # continuous batching: every queued FORWARD of this epoch
                    while backlog and backlog[0][0] == "frame" and backlog[0][1] == ev[1] \
                            and backlog[0][2].kind == wire.FORWARD:
                        frames.append(backlog.popleft()[2])
                    if ev[1] == self._epoch():
                        self._guard(self._forward, frames)
                    continue
                if ev[0] == "exit":
                    return
                self._guard(self._handle, ev)
            elif self.driver is not None and self.broken is None:
                self._guard(self._launch)

    def _epoch(self) -> int:
        return self.cfg.epoch if self.cfg is not None else -1

    def _guard(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            log.exception("group stage: %s failed", fn.__name__)
            self._break(f"{type(exc).__name__}: {exc}")

    def _break(self, reason: str) -> None:
        if self.broken is None:
            log.warning("group %s stage %s: pipeline broken: %s",
                        self.cfg.group if self.cfg else "?", self.addr, reason)
        self.broken = reason
        if self.out is not None:
            with contextlib.suppress(OSError):
                self.out.close()
            self.out = None

    def _handle(self, ev: tuple[Any, ...]) -> None:
        kind = ev[0]
        if kind == "configure":
            try:
                self._apply(ev[1])
            except Exception as exc:
                with self._cond:
                    self.failed = (ev[1].epoch, f"{type(exc).__name__}: {exc}")
                    self._cond.notify_all()
                raise
        elif kind == "submit":
            assert self.driver is not None
            self.driver.add(ev[1])
        elif kind == "abort" and self.driver is not None:
            if self.driver.abort(ev[1]):
                self._end([ev[1]])
        elif kind == "disband":
            if self.driver is not None:
                self.driver.fail_all(ev[1])
            self._break(ev[1])
        elif kind == "link_down" and ev[1] == self._epoch():
            self._break(ev[2])
        elif kind == "frame" and ev[1] == self._epoch():
            frame: wire.Frame = ev[2]
            if frame.kind == wire.RESULT and self.driver is not None:
                self._end(self.driver.on_results(frame.results))
            elif frame.kind == wire.END:
                assert self.part is not None
                for seq_id in frame.ended:
                    self.part.kv.free(seq_id)
                if self.cfg is not None and not self.cfg.last:
                    self._send(frame)

    def _apply(self, cfg: StageConfig) -> None:
        if self.latest is not None and self.latest.epoch > cfg.epoch:
            return  # a newer plan is queued behind this one
        old, self.cfg, self.broken = self.cfg, cfg, None
        if self.out is not None:
            with contextlib.suppress(OSError):
                self.out.close()
            self.out = None
        same = old is not None and self.part is not None and (
            old.model, old.start, old.end, old.first, old.last, old.num_blocks, old.block_size,
            old.dtype) == (cfg.model, cfg.start, cfg.end, cfg.first, cfg.last, cfg.num_blocks,
                           cfg.block_size, cfg.dtype)
        if same and self.part is not None:
            self.part.kv.clear()
        else:
            self.part = None  # free the old range before loading the new one
            self.part = StagePart(cfg.model, cfg.start, cfg.end, cfg.first, cfg.last,
                                  cfg.num_blocks, cfg.block_size, cfg.dtype, self.cpu_kernels)
        if cfg.first:
            if self.driver is None:
                self.driver = Driver(cfg.num_blocks, cfg.block_size, cfg.max_model_len,
                                     self.eos_ids, self.decode)
            self.driver.micro_batches = cfg.micro_batches or cfg.n_stages
            if self.driver.replay_all():
                log.warning("group %s epoch %d: replaying %d sequence(s) from their token "
                            "history", cfg.group, cfg.epoch, len(self.driver.ready))
        elif self.driver is not None:
            self.driver.fail_all("this member is no longer the group's first stage")
            self.driver = None
        if cfg.n_stages > 1:
            self.out = self._dial(cfg)
        log.info("group %s epoch %d: stage %d/%d layers [%d, %d) ready", cfg.group, cfg.epoch,
                 cfg.index + 1, cfg.n_stages, cfg.start, cfg.end)
        with self._cond:
            self.ready_epoch = cfg.epoch
            self._cond.notify_all()

    def _send(self, frame: wire.Frame) -> None:
        if self.out is None:
            raise ConnectionError("no link to the next stage")
        data = wire.encode(frame)
        self.out.sendall(data)
        self.stats["frames_out"] += 1
        self.stats["bytes_out"] += len(data)

    def _end(self, ended: list[int]) -> None:
        """Free finished sequences here and on every later stage."""
        if not ended:
            return
        assert self.part is not None and self.cfg is not None
        for seq_id in ended:
            self.part.kv.free(seq_id)
        if not self.cfg.last:
            self._send(wire.Frame(wire.END, ended=tuple(ended)))

    def _launch(self) -> None:
        """First stage: run one micro-batch through our layers and pass it on."""
        assert self.driver is not None and self.part is not None and self.cfg is not None
        batch = self.driver.next_batch()
        if batch is None:
            return
        fwd, ids = batch
        t0 = time.perf_counter()
        hidden = self.part.forward(fwd, torch.tensor(ids, dtype=torch.long))
        self._pass_on(fwd, hidden, t0)

    def _forward(self, frames: list[wire.Frame]) -> None:
        assert self.part is not None
        fwd = [f for fr in frames for f in fr.fwd]
        x = torch.cat([fr.hidden for fr in frames if fr.hidden is not None])
        t0 = time.perf_counter()
        self._pass_on(fwd, self.part.forward(fwd, x), t0)

    def _pass_on(self, fwd: list[wire.Fwd], hidden: torch.Tensor, t0: float) -> None:
        assert self.part is not None and self.cfg is not None
        if self.cfg.last:
            results = self.part.sample(fwd, hidden, self.end_ids)
            self.busy_s += time.perf_counter() - t0
            if self.cfg.first:  # one stage: the driver is here
                assert self.driver is not None
                self._end(self.driver.on_results(results))
            else:
                self._send(wire.Frame(wire.RESULT, results=tuple(results)))
            return
        self.busy_s += time.perf_counter() - t0
        self._send(wire.Frame(wire.FORWARD, fwd=tuple(fwd), hidden=hidden))

    def close(self) -> None:
        self.events.put(("exit",))
        with contextlib.suppress(OSError):
            self.listener.close()
        if self.out is not None:
            with contextlib.suppress(OSError):
                self.out.close()

