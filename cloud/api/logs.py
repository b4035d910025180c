"""Logging that an attacker cannot amplify: repeats of one message (same logger, same format
string, same exception type) pass a few times per window, then are counted and summarised once
the window turns. Installed on every handler, so records from asyncio (accept() failing with
EMFILE), uvicorn (invalid HTTP) and the app are all bounded."""

from __future__ import annotations

import logging
import threading
import time

WINDOW_S = 10.0  # repeats are counted per window
PER_WINDOW = 5  # copies of one message that pass per window
_MAX_KEYS = 4096  # distinct messages tracked (then the table starts afresh)


class RepeatFilter(logging.Filter):
    def __init__(self, window_s: float = WINDOW_S, per_window: int = PER_WINDOW) -> None:
        super().__init__()
        self.window_s = window_s
        self.per_window = per_window
        self._seen: dict[tuple[str, str, str], tuple[float, int]] = {}  # → (window start, n)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "pice_access", False):
            return True  # info lines are not repeated errors (the access log is its own)
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, str(record.msg), exc)
        now = time.monotonic()
        with self._lock:
            if len(self._seen) > _MAX_KEYS:
                self._seen.clear()
            start, n = self._seen.get(key, (now, 0))
            if now - start >= self.window_s:
                if n > self.per_window:  # say how many the last window dropped, once
                    record.msg = f"{record.msg} [{n - self.per_window} similar suppressed " \
                                 f"in the last {self.window_s:g}s]"
                start, n = now, 0
            self._seen[key] = (start, n + 1)
        return n < self.per_window


_FILTER = RepeatFilter()


def install_repeat_filter() -> None:
    """Put the one shared filter on every handler of the root and uvicorn loggers (and on
    Python's last-resort handler); idempotent."""
    handlers = [h for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "asyncio")
                for h in logging.getLogger(name).handlers]
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for h in handlers:
        if _FILTER not in h.filters:
            h.addFilter(_FILTER)
