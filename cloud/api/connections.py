"""Connection bounds below the ASGI app, where uvicorn has none: a deadline for a request's
headers (slowloris, half-open upgrades, silent connections), an idle deadline for its body, and
a cap on open connections that first closes the oldest idle one (so a flood of half-open sockets
never exhausts file descriptors and /health keeps answering). Plus the uvicorn config that uses
them and the log filter that keeps an attack from flooding the log."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pice.cloud.api.logs import install_repeat_filter
from pice.shared.config import ServeSettings

log = logging.getLogger(__name__)

FD_RESERVE = 64  # descriptors kept free for model files, logs and the agents' WebSockets
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
         b"retry-after: 1\r\nconnection: close\r\ncontent-length: 108\r\n\r\n"
         b'{"error": {"message": "too many open connections; retry later", '
         b'"type": "service_unavailable", "code": 503}}')
assert _BUSY.endswith(b"}}") and len(_BUSY.split(b"\r\n\r\n", 1)[1]) == 108


class Bounds:
    """Per-server limits shared by its connections (the protocol factory gets one)."""

    def __init__(self, header_timeout_s: float, body_timeout_s: float,
                 max_connections: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self.evicted = 0  # idle connections closed to make room
        self.refused = 0  # connections answered 503 (no idle one to close)
        self.timed_out = 0  # requests whose headers or body stalled


def effective_max_connections(wanted: int) -> int:
    """`wanted`, lowered to fit under the process's descriptor limit with a reserve."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft == resource.RLIM_INFINITY:
        return wanted
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 0
    room = max(8, soft - in_use - FD_RESERVE)
    if room < wanted:
        log.warning("max_connections lowered from %d to %d to fit the descriptor limit (%d)",
                    wanted, room, soft)
    return min(wanted, room)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    bounds: Bounds  # set on the subclass made for one server (see bounded_protocol)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened = time.monotonic()
        self._deadline: asyncio.TimerHandle | None = None
        self._reading_headers = True

    # connection lifecycle
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.bounds.max_connections and not self._make_room():
            self.bounds.refused += 1
            transport.write(_BUSY)
            transport.close()
            return
        self._arm(self.bounds.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _idle(self) -> bool:
        return not self.transport.is_closing() and (
            self.cycle is None or self.cycle.response_complete)

    def _make_room(self) -> bool:
        """Close the oldest idle connection (no request being answered); False if none."""
        idle = [c for c in self.connections
                if c is not self and isinstance(c, BoundedHttpToolsProtocol) and c._idle()]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.opened)
        self.bounds.evicted += 1
        oldest.transport.close()
        return True

    # request phases
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = True
        self._arm(self.bounds.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        self._arm(self.bounds.body_timeout_s)  # until the body is in (reset per chunk)
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()  # the WebSocket protocol owns the connection now (pings, the hub's lease)
        super().handle_websocket_upgrade()

    def on_body(self, body: bytes) -> None:
        self._arm(self.bounds.body_timeout_s)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # the deadline
    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._reading_headers:
            busy = self.cycle is not None and not self.cycle.response_complete
            stalled = not busy  # (busy: a pipelined request waits for the one before it)
        else:
            stalled = not (self.flow is not None and self.flow.read_paused)  # paused: the app
        if not stalled:                                                       # reads slowly
            self._arm(self.bounds.header_timeout_s if self._reading_headers
                      else self.bounds.body_timeout_s)
            return
        self.bounds.timed_out += 1
        self.transport.close()  # a running app sees http.disconnect


def bounded_protocol(bounds: Bounds) -> type[BoundedHttpToolsProtocol]:
    return type("BoundedHttp", (BoundedHttpToolsProtocol,), {"bounds": bounds})


def server_config(app: Any, settings: ServeSettings, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn config of `pice serve` (and of tests that start the real server)."""
    bounds = Bounds(settings.header_timeout_s, settings.body_timeout_s,
                    effective_max_connections(settings.max_connections))
    app.state.connection_bounds = bounds
    kwargs.setdefault("log_level", "info")
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, http=bounded_protocol(bounds),
        timeout_keep_alive=settings.keep_alive_s, ws_ping_interval=settings.ws_ping_s,
        ws_ping_timeout=settings.ws_ping_s, ws_max_size=16 * 1024 * 1024,
        backlog=min(2048, bounds.max_connections), **kwargs)
    install_repeat_filter()
    return config
