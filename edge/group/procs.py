"""Group stages as processes (`python -m pice.edge.group.node_main`), driven by JSON lines: for
`pice bench group` and the tests. Waits use generous deadlines."""

from __future__ import annotations

import ctypes
import json
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

WAIT_S = 180.0


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the parent dies (even by SIGKILL)."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG (Linux)


class StageProc:
    """One stage process; its stderr goes to a log file."""

    def __init__(self, log_dir: Path, name: str, taskset: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.name = name
        self.log_path = log_dir / f"stage-{name}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "pice.edge.group.node_main", "--listen", "127.0.0.1:0",
               *extra]
        if taskset is not None:
            cmd = ["taskset", "-c", taskset, *cmd]
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, text=True, preexec_fn=die_with_parent)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.kept: list[dict[str, Any]] = []  # events read while waiting for another kind
        threading.Thread(target=self._read, daemon=True).start()
        self.addr = self.wait(lambda e: e["event"] == "listening")["addr"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def log(self) -> str:
        return self.log_path.read_text()

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def wait(self, match: Any, timeout: float = WAIT_S) -> dict[str, Any]:
        """The first event (kept or new) that `match`es; others stay queued for later waits."""
        for i, ev in enumerate(self.kept):
            if match(ev):
                return self.kept.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self.events.empty()):
                raise AssertionError(f"stage {self.name}: no matching event\n{self.log()}")
            try:
                ev = self.events.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if match(ev):
                return ev
            self.kept.append(ev)

    def generate(self, batch: list[list[int]], max_tokens: int, **kw: Any) -> None:
        for i, p in enumerate(batch):
            self.send({"generate": {"id": str(i), "prompt_ids": p, "max_tokens": max_tokens,
                                    "ignore_eos": True, **kw}})

    def results(self, n: int, timeout: float = WAIT_S) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        while len(out) < n:
            ev = self.wait(lambda e: e["event"] == "done", timeout)
            out[ev["id"]] = ev
        return out

    def stats(self) -> dict[str, Any]:
        self.send({"stats": True})
        return self.wait(lambda e: e["event"] == "stats")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def configure(stages: list[StageProc], model: Path, ranges: list[tuple[int, int]], epoch: int,
              num_blocks: int = 128, block_size: int = 4, **kw: Any) -> None:
    """Send one plan (a ring over `stages` in order) and wait until every stage applied it."""
    token = secrets.token_hex(16)
    n = len(stages)
    for i, (s, (start, end)) in enumerate(zip(stages, ranges, strict=True)):
        cfg = dict(group="g", epoch=epoch, model=str(model), index=i, n_stages=n, start=start,
                   end=end, next_addr=stages[(i + 1) % n].addr if n > 1 else None, token=token,
                   num_blocks=num_blocks, block_size=block_size, **{"max_model_len": 512, **kw})
        s.send({"configure": cfg})
    for s in stages:
        ev = s.wait(lambda e, epoch=epoch: e["event"] in ("ready", "failed")
                    and e["epoch"] == epoch)
        if ev["event"] != "ready":
            raise AssertionError(f"stage {s.name} could not apply plan {epoch}: {ev['error']}")
