"""The links of a group stage: the listener its previous stage dials (HELLO with the group token
of the current plan, checked in constant time) and the dialler to its next stage. Each accepted
link gets a reader thread that turns frames into events for the compute thread."""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from pice.edge.group import wire

log = logging.getLogger(__name__)

CONNECT_DEADLINE_S = 120.0  # how long a stage keeps dialling its next one after a plan


@dataclass(frozen=True)
class StageConfig:
    """What the hub tells one member (see shared/protocol.py HubGroupPlan)."""

    group: str
    epoch: int  # plan number; frames and connections of older plans are dropped
    model: str  # local model directory
    index: int  # position in the pipeline (0: first, holds the driver)
    n_stages: int
    start: int  # first layer (inclusive)
    end: int  # last layer (exclusive)
    next_addr: str | None  # "host:port" of the next stage (the last's is the first); None: 1 stage
    token: str  # per-group-per-epoch secret every connection presents
    num_blocks: int  # KV blocks on every stage (the driver admits within this)
    block_size: int = 16
    dtype: str = "float32"
    micro_batches: int = 0  # decode micro-batches in flight (0: one per stage)
    max_model_len: int = 4096

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.n_stages - 1


class Links:
    """Mixin of StageNode: needs `listener`, `latest`, `_cond`, `events` and `part`."""

    listener: socket.socket
    latest: StageConfig | None
    _cond: threading.Condition
    events: queue.Queue[tuple[Any, ...]]
    part: Any

    # ---- the listener side ------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._inbound, args=(conn,), daemon=True).start()

    def _inbound(self, conn: socket.socket) -> None:
        epoch = -1
        try:
            conn.settimeout(30.0)
            epoch, token = wire.read_hello(conn)
            with self._cond:  # the plan may reach us after our previous stage got it
                self._cond.wait_for(lambda: self.latest is not None
                                    and self.latest.epoch >= epoch, timeout=CONNECT_DEADLINE_S)
                cfg = self.latest
            if cfg is None or cfg.epoch != epoch or not wire.token_ok(token, cfg.token):
                log.warning("refused a stage connection (epoch %d)", epoch)
                conn.close()
                return
            conn.sendall(b"\x01")
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            width = self.part.width if self.part is not None else None
            while True:
                self.events.put(("frame", epoch, wire.read_frame(conn, width)))
        except Exception as exc:  # EOF, reset, a malformed frame: the link is gone
            if epoch >= 0:
                self.events.put(("link_down", epoch, f"inbound link lost: {exc}"))
        finally:
            conn.close()

    def _dial(self, cfg: StageConfig) -> socket.socket:
        assert cfg.next_addr is not None
        host, port = cfg.next_addr.rsplit(":", 1)
        deadline = time.monotonic() + CONNECT_DEADLINE_S
        while True:
            try:
                sock = socket.create_connection((host, int(port)), timeout=CONNECT_DEADLINE_S)
                sock.sendall(wire.hello(cfg.epoch, cfg.token))
                if sock.recv(1) == b"\x01":
                    sock.settimeout(None)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    return sock
                sock.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ConnectionError(f"next stage {cfg.next_addr} did not accept epoch "
                                      f"{cfg.epoch}")
            time.sleep(0.05)

