"""A real `python -m pice serve` process on loopback (an OpenAI-compatible upstream for the
`openai` cloud backend), killable and stoppable. Waits use deadlines; no timing is asserted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pice.bench.progressive_remote import die_with_parent
from tests.edge.agent_procs import WAIT_S


class PiceProcess:
    def __init__(self, port: int, model_dir: Path, tmp: Path,
                 env: dict[str, str] | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = tmp / f"pice-serve-{port}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "pice", "serve", "--port", str(port),
               "--cloud-model", str(model_dir), "--edge-model", str(model_dir),
               "--cache-dir", str(tmp / "cache"), "--threads", "1"]
        full_env = {**os.environ, "PICE_MAX_CONTEXT": "1024", "PICE_DEFAULT_MAX_TOKENS": "64",
                    "PICE_GUARD": "false", **(env or {})}
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                         preexec_fn=die_with_parent)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"pice serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"pice serve at {self.url} not ready in {timeout}s:\n{self.log()}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(30)
