"""`pice ask`: one question, printed as it arrives (sketch first, then each section)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from pice.shared.config import ServeSettings

CONNECT_S = 5.0  # a server that does not accept within this is "none answers"
EVENT_GAP_S = 120.0  # longest silence between two events (the server pings every 15 s)


class _Printer:
    """Sketch points as each line completes; sections as they finish, but never before the whole
    sketch is on screen (one that finishes earlier, under eager expansion, waits for it)."""

    def __init__(self) -> None:
        self.points = 0  # sketch points printed so far
        self.sketch_done = False
        self.held: list[dict[str, Any]] = []  # sections that finished before the sketch

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        out = sys.stdout
        if kind == "point":
            self._point(data["index"], data["text"])
        elif kind == "sketch":
            for i, p in enumerate(data["points"]):
                if i >= self.points:
                    self._point(i, p)
            self.sketch_done = True
            out.write("\nAnswer:\n")
            for held in self.held:
                self._section(held)
            self.held = []
        elif kind == "section":
            if self.sketch_done:
                self._section(data)
            else:
                self.held.append(data)
        elif kind == "delta":
            out.write(data["text"])
        elif kind == "done":
            for held in self.held:  # a sketch that never completed still shows its sections
                self._section(held)
            t = data["timings"]
            tok = data["tokens"]
            out.write(f"\n[{data['mode']}: {data['reason']}; total {t['total']:.1f}s, "
                      f"first text {t['ttft']:.1f}s; cloud {tok['cloud']} tokens, "
                      f"edge {tok['edge']} tokens]\n")
        elif kind == "error":
            out.write(f"\nerror: {data['error']['message']}\n")
        out.flush()

    def _point(self, index: int, text: str) -> None:
        if self.points == 0:
            sys.stdout.write("Sketch:\n")
        sys.stdout.write(f"  {index + 1}. {text}\n")
        self.points = max(self.points, index + 1)

    @staticmethod
    def _section(data: dict[str, Any]) -> None:
        sys.stdout.write(f"{data['index'] + 1}. {data['text']}\n")


async def ask_local(settings: ServeSettings, body: dict[str, Any]) -> int:
    """`--local`: load every model in this process (as `pice serve` does) and answer once."""
    from pice.cloud.api.progressive import _answer_request
    from pice.cloud.api.schemas import ProgressiveRequest
    from pice.cloud.events import DeltaEvent, DoneEvent, PointEvent, SectionEvent, SketchEvent
    from pice.cloud.metrics import Metrics
    from pice.runtime import build_pipeline

    req = _answer_request(ProgressiveRequest(**{k: v for k, v in body.items() if v is not None}),
                          settings.default_max_tokens)
    pipeline = build_pipeline(settings, Metrics())
    pipeline.validate(req)
    _print = _Printer()
    async for ev in pipeline.run(req):
        if isinstance(ev, PointEvent):
            _print("point", {"index": ev.index, "text": ev.text})
        elif isinstance(ev, SketchEvent):
            _print("sketch", {"points": ev.points})
        elif isinstance(ev, SectionEvent):
            _print("section", {"index": ev.index, "text": ev.text})
        elif isinstance(ev, DeltaEvent):
            _print("delta", {"text": ev.text})
        elif isinstance(ev, DoneEvent):
            _print("done", {"mode": ev.mode, "reason": ev.reason, "timings": ev.timings,
                            "tokens": ev.tokens})
    return 0


def default_url(settings: ServeSettings) -> str:
    """Where `pice serve` listens with the same settings (PICE_HOST / PICE_PORT)."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "", "::") else settings.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.port}"


@dataclass
class RemoteOptions:
    url: str
    api_key: str | None = None
    wait_s: float = 600.0  # how long to wait for a server that is still loading its models
    timeout_s: float = 900.0  # the whole answer (the server's pings keep a slow one alive)


def _fail(message: str) -> int:
    print(f"pice: error: {message}", file=sys.stderr)
    return 1


def _wait_ready(client: httpx.Client, opts: RemoteOptions) -> str | None:
    """None once GET /ready is 200; else why not (no server, failed, still loading)."""
    deadline = time.monotonic() + opts.wait_s
    told = False
    while True:
        try:
            r = client.get("/ready")
        except httpx.TransportError as exc:
            return (f"no pice server at {opts.url} ({type(exc).__name__}); start one with "
                    "`make serve`, or pass --local to load the models in this process")
        if r.status_code == 200:
            return None
        try:
            state = r.json()
        except ValueError:
            return f"{opts.url}/ready answered {r.status_code} and is not a pice server"
        if state.get("status") != "loading":
            return f"the server at {opts.url} is not ready: {state.get('error', r.text)}"
        if time.monotonic() >= deadline:
            return (f"the server at {opts.url} is still loading its models after "
                    f"{opts.wait_s:g}s (--wait); try again when GET /ready is 200")
        if not told:
            print(f"pice: the server at {opts.url} is loading its models; waiting up to "
                  f"{opts.wait_s:g}s (--wait)", file=sys.stderr)
            told = True
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


def ask_remote(opts: RemoteOptions, body: dict[str, Any]) -> int:
    """Ask a running server (`pice serve`) and print its progressive answer as it streams."""
    headers = {"authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    with httpx.Client(base_url=opts.url, headers=headers,
                      timeout=httpx.Timeout(EVENT_GAP_S, connect=CONNECT_S)) as probe:
        problem = _wait_ready(probe, opts)
    if problem is not None:
        return _fail(problem)
    try:
        return asyncio.run(asyncio.wait_for(_stream(opts, headers, body), opts.timeout_s))
    except asyncio.TimeoutError:
        return _fail(f"no complete answer from {opts.url} within {opts.timeout_s:g}s "
                     "(--timeout)")


async def _stream(opts: RemoteOptions, headers: dict[str, str], body: dict[str, Any]) -> int:
    timeout = httpx.Timeout(EVENT_GAP_S, connect=CONNECT_S)
    payload = {k: v for k, v in body.items() if v is not None}
    try:
        async with httpx.AsyncClient(base_url=opts.url, timeout=timeout,
                                     headers=headers) as client, aconnect_sse(
                client, "POST", "/v1/progressive", json=payload) as source:
            if source.response.status_code != 200:
                await source.response.aread()
                try:
                    message = source.response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = source.response.text
                if source.response.status_code == 401:
                    message += " (pass --api-key or set PICE_API_KEY)"
                return _fail(f"{source.response.status_code} from {opts.url}: {message}")
            _print = _Printer()
            async for sse in source.aiter_sse():
                _print(sse.event, json.loads(sse.data))
                if sse.event == "error":
                    return 1
    except httpx.ReadTimeout:
        return _fail(f"the server at {opts.url} sent nothing for {EVENT_GAP_S:g}s")
    except httpx.TransportError as exc:
        return _fail(f"lost the server at {opts.url}: {type(exc).__name__}: {exc}")
    return 0
