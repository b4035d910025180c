"""`pice ask`: one question, printed as it arrives (sketch first, then each section)."""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from pice.cloud.api.progressive import _answer_request
from pice.cloud.api.schemas import ProgressiveRequest
from pice.cloud.events import DeltaEvent, DoneEvent, PointEvent, SectionEvent, SketchEvent
from pice.cloud.metrics import Metrics
from pice.runtime import build_pipeline
from pice.shared.config import ServeSettings


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


async def ask_remote(url: str, body: dict[str, Any]) -> int:
    payload = {k: v for k, v in body.items() if v is not None}
    timeout = httpx.Timeout(10, read=900)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client, aconnect_sse(
            client, "POST", "/v1/progressive", json=payload) as source:
        if source.response.status_code != 200:
            await source.response.aread()
            print(f"error {source.response.status_code}: {source.response.text}",
                  file=sys.stderr)
            return 1
        _print = _Printer()
        async for sse in source.aiter_sse():
            _print(sse.event, json.loads(sse.data))
            if sse.event == "error":
                return 1
    return 0
