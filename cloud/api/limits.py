"""Per-request bounds and bookkeeping, as one ASGI middleware around the app: a token bucket per
API key and a cap on concurrent generation requests per tenant, both answered 429 with
Retry-After (requests with a missing or invalid key count against their client address; an open
server, with no keys, limits per client address only when `limit_open_clients` is set); the
in-flight gauge per endpoint; and one structured (JSON) access-log line per request."""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pice.cloud.api.errors import error_body
from pice.cloud.metrics import Metrics
from pice.cloud.tenants import TenantRegistry, hash_key
from pice.shared.errors import PiceError

access_log = logging.getLogger("pice.access")

STREAM_PATHS = frozenset({"/v1/chat/completions", "/v1/progressive"})  # generation requests
ENDPOINTS = ("/v1/chat/completions", "/v1/progressive", "/v1/adapters", "/v1/models",
             "/v1/edges", "/health", "/ready", "/metrics")
_MAX_KEYS = 100_000  # buckets kept (least recently used dropped first)
PROBES = frozenset({"/health", "/ready", "/metrics"})  # polled: their access lines at DEBUG


def endpoint_of(path: str) -> str:
    """A bounded label for a path (the route prefix it falls under, else "other")."""
    return next((e for e in ENDPOINTS if path == e or path.startswith(e + "/")), "other")


class TokenBuckets:
    """`burst` requests at once per key, refilled at `rate` per second (rate 0: unlimited)."""

    def __init__(self, rate: float, burst: int) -> None:
        assert rate >= 0 and burst >= 1, (rate, burst)
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # → (tokens, at)

    def take(self, key: str, now: float | None = None) -> float:
        """0 when the request may go; else the seconds until the key has a token again."""
        if self.rate == 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1 if wait == 0 else tokens, now)
        while len(self._buckets) > _MAX_KEYS:
            self._buckets.popitem(last=False)
        return wait


class RequestLimits:
    def __init__(self, app: ASGIApp, tenants: TenantRegistry, metrics: Metrics,
                 rate: float, burst: int, max_streams: int,
                 limit_open_clients: bool = False) -> None:
        self.app = app
        self.tenants = tenants
        self.metrics = metrics
        self.buckets = TokenBuckets(rate, burst)
        self.max_streams = max_streams
        self.limited = not tenants.open or limit_open_clients  # whether any limit applies
        self.streams: dict[str, int] = {}  # running generation requests per tenant/client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        endpoint = endpoint_of(path)
        client = (scope.get("client") or ("?", 0))[0]
        key_id, tenant = self._caller(scope)
        note: dict[str, Any] = {"tenant": tenant}  # handlers add mode and timings
        scope.setdefault("state", {})["access"] = note
        start = time.perf_counter()
        seen: dict[str, Any] = {"status": 0, "ttfb_s": None}

        async def send_and_see(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                seen["status"] = msg["status"]
                seen["ttfb_s"] = round(time.perf_counter() - start, 6)
            await send(msg)

        refusal = stream_key = None
        if self.limited:
            refusal = self._refusal(path, method, key_id or f"ip:{client}",
                                    tenant if tenant and not self.tenants.open
                                    else f"ip:{client}")
            stream_key = None if refusal else self._stream_key(path, method, tenant, client)
        gauge = self.metrics.inflight.labels(endpoint)
        gauge.inc()
        try:
            if refusal is not None:
                retry, limit, message = refusal
                self.metrics.limited.labels(limit).inc()
                self.metrics.errors.labels("429").inc()
                await JSONResponse(error_body(429, message), status_code=429,
                                   headers={"Retry-After": str(retry)})(scope, receive,
                                                                        send_and_see)
            else:
                await self.app(scope, receive, send_and_see)
        finally:
            gauge.dec()
            if stream_key is not None:
                self.streams[stream_key] -= 1
                if not self.streams[stream_key]:
                    del self.streams[stream_key]
            line = {"method": method, "path": path, "status": seen["status"], "client": client,
                    "duration_s": round(time.perf_counter() - start, 6),
                    "ttfb_s": seen["ttfb_s"], **note}
            level = logging.DEBUG if path in PROBES and method == "GET" else logging.INFO
            access_log.log(level, json.dumps(line, default=str), extra={"pice_access": True})

    def _caller(self, scope: Scope) -> tuple[str | None, str | None]:
        """(an id of the presented API key, its tenant); Nones when absent or invalid (so
        random keys cannot buy fresh buckets: those requests count against the address)."""
        auth = next((v.decode("latin-1") for k, v in scope.get("headers", [])
                     if k == b"authorization"), None)
        try:
            tenant = self.tenants.authenticate(auth).name
        except PiceError:
            return None, None
        _, _, key = (auth or "").partition(" ")
        return (hash_key(key.strip())[7:23] if key.strip() and not self.tenants.open
                else None), tenant

    def _refusal(self, path: str, method: str, bucket: str,
                 streams: str) -> tuple[int, str, str] | None:
        """(Retry-After seconds, which limit, message) when the request must wait."""
        if not path.startswith("/v1/"):
            return None  # health, readiness and metrics always answer
        wait = self.buckets.take(bucket)
        if wait > 0:
            return max(1, math.ceil(wait)), "rate", \
                f"rate limit: {self.buckets.burst} requests at once, then " \
                f"{self.buckets.rate:g} per second per API key; retry later"
        if path in STREAM_PATHS and method == "POST" \
                and self.streams.get(streams, 0) >= self.max_streams:
            return 1, "streams", f"too many concurrent requests: at most {self.max_streams} " \
                                 "generation requests run at once per tenant; retry later"
        return None

    def _stream_key(self, path: str, method: str, tenant: str | None,
                    client: str) -> str | None:
        if path not in STREAM_PATHS or method != "POST":
            return None
        key = tenant if tenant and not self.tenants.open else f"ip:{client}"
        self.streams[key] = self.streams.get(key, 0) + 1
        return key
