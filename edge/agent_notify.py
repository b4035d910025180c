"""systemd's notification protocol (sd_notify): one datagram per message to $NOTIFY_SOCKET, and
the watchdog period from $WATCHDOG_USEC. Without NOTIFY_SOCKET (not under systemd) it is a no-op."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping


class SystemdNotifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        self.watchdog_s = _watchdog_period(env)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *assignments: str) -> None:
        """Send e.g. notify("READY=1", "STATUS=connected"); failures are not fatal."""
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, \
                contextlib.suppress(OSError):  # systemd went away: nothing to tell
            sock.sendto("\n".join(assignments).encode(), self.address)


def _watchdog_period(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked for."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
