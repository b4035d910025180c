"""The shipped systemd unit passes `systemd-analyze verify` with no message at all, and a real
agent process speaks sd_notify: READY=1 once its model is loaded, WATCHDOG=1 while it runs (also
while it cannot reach the cloud), STOPPING=1 on SIGTERM, then exit 0."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from tests.conftest import _free_port
from tests.edge.agent_procs import WAIT_S, Agent

UNIT = resources.files("pice.edge").joinpath("systemd/pice-edge.service")
SHIPPED_EXEC = "/opt/pice/venv/bin/pice"


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on the unit, its ExecStart pointed at this venv's `pice` (verify
    checks that the binary exists)."""
    pice = Path(sys.executable).with_name("pice")
    assert pice.exists(), pice
    unit = tmp_path / "pice-edge.service"
    unit.write_text(unit_text.replace(SHIPPED_EXEC, str(pice)))
    return subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=120)


needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_asks_for_notify_watchdog_restart_user_and_hardening() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"] and d["WatchdogSec"] and d["Restart"] == ["on-failure"]
    assert d["User"] == ["pice-edge"] and d["ExecStart"][0].startswith(SHIPPED_EXEC + " edge ")
    for key in ("NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                "RestrictAddressFamilies", "SystemCallFilter", "CapabilityBoundingSet"):
        assert key in d, key


@needs_systemd
def test_unit_passes_systemd_analyze_verify_silently(tmp_path: Path) -> None:
    out = verify(UNIT.read_text(), tmp_path)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


@needs_systemd
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("Type=notify", "Type=notify\nWatchdogSecs=30s")
    out = verify(broken, tmp_path)
    assert "WatchdogSecs" in out.stdout + out.stderr


def test_agent_sends_ready_then_keeps_the_watchdog_fed(tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(WAIT_S)
    # nothing listens at the cloud URL: the agent keeps reconnecting and stays alive
    agent = Agent(f"ws://127.0.0.1:{_free_port()}", "pice-edge.x.y", "notify-test",
                  tiny_model_dir, tmp_path / "cache", tmp_path,
                  env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000"})
    try:
        messages: list[str] = []
        while sum("WATCHDOG=1" in m for m in messages) < 5:
            messages.append(sock.recv(4096).decode())
        assert "READY=1" in messages[0].splitlines()
        assert not any("WATCHDOG=1" in m for m in messages[:1])
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0
        sock.setblocking(False)  # the agent has exited: all it sent is queued
        rest = []
        with contextlib.suppress(BlockingIOError):
            while True:
                rest.append(sock.recv(4096).decode())
        assert any("STOPPING=1" in m.splitlines() for m in rest)
    finally:
        agent.stop()
        sock.close()
