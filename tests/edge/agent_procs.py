"""Real edge-agent processes for tests: `python -m pice edge …` against a live server, and the
server's view of them through GET /v1/edges. Waits use deadlines; no timing is asserted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from pice.bench.progressive_remote import die_with_parent
from pice.cloud.edge_tokens import EdgeTokenStore

WAIT_S = 600.0  # a hang guard, not a race: a process loading torch on a busy box may be slow


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Agent:
    """One `pice edge` process; its log goes to a file (shown when a wait fails)."""

    def __init__(self, url: str, token: str, edge_id: str, model_dir: Path, cache_dir: Path,
                 log_dir: Path, slots: int = 4, env: dict[str, str] | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.edge_id = edge_id
        self.log_path = log_dir / f"agent-{edge_id}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "pice", "edge", "--cloud", url, "--edge-id", edge_id,
               "--model", str(model_dir), "--slots", str(slots), "--cache-dir", str(cache_dir),
               "--threads", "1", "--drain-timeout", "60", *extra]
        full_env = {**os.environ, "PICE_EDGE_TOKEN": token, **(env or {})}
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                         preexec_fn=die_with_parent)

    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent {self.edge_id} did not exit:\n{self.log()}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(30)


def edges(url: str) -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{url}/v1/edges", timeout=10).json()
    return {e["edge_id"]: e for e in body["data"]}


def wait_registered(url: str, *agents: Agent) -> None:
    ids = {a.edge_id for a in agents}

    def ready() -> bool:
        live = edges(url)
        for a in agents:
            if a.proc.poll() is not None:
                raise AssertionError(f"agent {a.edge_id} exited {a.proc.returncode}:\n{a.log()}")
        return all(i in live and live[i]["healthy"] for i in ids)

    wait_for(f"agents {sorted(ids)} to register", ready)


def make_tokens(path: Path, *edge_ids: str) -> dict[str, str]:
    store = EdgeTokenStore(path)
    return {e: store.create(e)[1] for e in edge_ids}
