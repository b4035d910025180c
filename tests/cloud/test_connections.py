"""Connection bounds of a real `pice serve` process on loopback, started with a low descriptor
limit: half-open requests (headers, body, WebSocket upgrade, silence) are closed; a flood of idle
connections past the cap neither exhausts descriptors nor stops /health; a flood of malformed
requests does not flood the log. Waits use generous deadlines; no timing is asserted."""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pice.bench.progressive_remote import die_with_parent
from pice.cloud.api.logs import RepeatFilter
from tests.conftest import _free_port
from tests.edge.agent_procs import wait_for

FD_LIMIT = 256  # the server's RLIMIT_NOFILE
FLOOD = 400  # idle connections opened at once: more than the server has descriptors


class Server:
    def __init__(self, model_dir: Path, tmp: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "serve.log"
        env = {**os.environ, "PICE_PORT": str(self.port), "PICE_CLOUD_MODEL": str(model_dir),
               "PICE_EDGE_MODELS": json.dumps([str(model_dir)]), "PICE_MAX_CONTEXT": "1024",
               "PICE_CACHE_DIR": str(tmp / "cache"), "PICE_THREADS": "1",
               "PICE_HEADER_TIMEOUT_S": "2", "PICE_BODY_TIMEOUT_S": "2"}

        def limit() -> None:
            die_with_parent()
            resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))

        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "pice", "serve"], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> int:
        try:
            return httpx.get(f"{self.url}/health", timeout=30).status_code
        except httpx.TransportError:
            return 0

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=60)


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tiny_model_dir, tmp_path_factory.mktemp("serve"))
    try:
        def up() -> bool:
            if s.proc.poll() is not None:
                pytest.fail(f"server exited:\n{s.log()}")
            return s.health() == 200

        wait_for("the server to answer /health", up)
        yield s
    finally:
        s.proc.kill()
        s.proc.wait(30)


def closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes (b"" or a reset); the socket's 60 s timeout is the deadline."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize("sent", [
    b"",  # connects, says nothing
    b"GET /health HTTP/1.1\r\nHost: x\r\n",  # headers never end
    b"POST /v1/progressive HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100\r\n\r\n{\"question\":",  # body never ends
    b"GET /v1/edges/connect HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\n",  # WebSocket upgrade never completes
], ids=["silent", "headers", "body", "upgrade"])
def test_half_open_requests_are_closed(served: Server, sent: bytes) -> None:
    with served.connect() as sock:
        sock.sendall(sent)
        assert closed_by_server(sock)  # before: held open for good (recv timed out)


def test_idle_flood_past_the_descriptor_limit_keeps_health_answering(served: Server) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FLOOD + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, FLOOD + 256), hard))
    flood = [served.connect() for _ in range(FLOOD)]
    try:
        assert served.health() == 200  # before: accept() failed with EMFILE, /health hung
        r = httpx.get(f"{served.url}/metrics", timeout=30)
        closed = {line.split("{")[1].split('"')[1]: float(line.rsplit(" ", 1)[1])
                  for line in r.text.splitlines()
                  if line.startswith("pice_connections_closed_total{")}
        assert closed["evicted_idle"] + closed["timed_out"] >= FLOOD - FD_LIMIT
    finally:
        for s in flood:
            s.close()
    assert "out of system resource" not in served.log()
    assert "Too many open files" not in served.log()


def test_malformed_request_flood_does_not_flood_the_log(served: Server) -> None:
    before = served.log().count("Invalid HTTP request")
    for _ in range(300):
        with served.connect() as sock:
            sock.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
            closed_by_server(sock)
    assert served.health() == 200
    assert served.log().count("Invalid HTTP request") - before <= 30  # before: 300 lines


def test_repeat_filter_passes_a_few_then_summarises() -> None:
    f = RepeatFilter(window_s=3600, per_window=5)

    def record(msg: str, level: int = logging.ERROR) -> logging.LogRecord:
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            return logging.LogRecord("asyncio", level, __file__, 1, msg, None, sys.exc_info())

    passed = sum(f.filter(record("socket.accept() out of system resource")) for _ in range(1000))
    assert passed == 5
    assert f.filter(record("another message"))  # other messages are counted apart
    assert all(f.filter(record("info", logging.INFO)) for _ in range(100))  # not errors
    f.window_s = 0  # the window turns: the next copy passes and says what was dropped
    r = record("socket.accept() out of system resource")
    assert f.filter(r) and "995 similar suppressed" in str(r.msg)
