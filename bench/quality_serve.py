"""The quality bench's answers: one real server (the `pice serve` app on loopback, in this process
so the judge can borrow its cloud model afterwards), several requests in flight so the engines
batch, every answer cached as JSON so judging and reruns reuse it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn
from tqdm import tqdm

from pice.cloud.api.app import create_app
from pice.cloud.pipeline import Pipeline
from pice.shared.config import ServeSettings

T = TypeVar("T")
REQUEST_S = 1800.0  # one answer's deadline (a loaded 2-core machine is slow, never this slow)


class Server:
    """The app over HTTP on 127.0.0.1, serving `pipeline`, on its own event-loop thread."""

    def __init__(self, settings: ServeSettings, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        app = create_app(settings, lambda s, m: pipeline)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    log_level="warning", lifespan="on"))
        self._serving = asyncio.run_coroutine_threadsafe(self.server.serve(), self.loop)
        deadline = time.monotonic() + 600
        while not self.server.started:
            if self._serving.done():
                self._serving.result()  # raises why it did not start
            if time.monotonic() > deadline:
                raise TimeoutError("the bench server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.server.should_exit = True
        try:
            self._serving.result(timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=60)


def cache_path(cache_dir: Path, phase: str, settings: dict[str, Any]) -> Path:
    """One JSON file per phase and setting (models, budgets): question id → answer record."""
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir / "bench-quality" / f"{phase}-{tag[:12]}.json"


def load_cache(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text())) if path.exists() else {}


def _record(body: dict[str, Any], wall: float) -> dict[str, Any]:
    sections = body.get("sections", [])
    winners: dict[str, int] = {}
    for s in sections:
        who = s["worker"] if s.get("repaired") else s["model"] + (
            f"+{s['adapter']}" if s.get("adapter") else "")
        winners[who] = winners.get(who, 0) + 1
    return {"text": body["text"], "mode": body["mode"], "reason": body["reason"],
            "sketch": body["sketch"], "timings": body["timings"], "tokens": body["tokens"],
            "ensemble": body.get("ensemble", 1), "repaired": len(body.get("repaired", [])),
            "winners": winners, "scores": [s.get("score") for s in sections],
            "client_latency_s": wall}


def generate(server: Server, questions: list[dict[str, Any]], phase: str, mode: str,
             eager: bool | None, path: Path, max_tokens: int, max_points: int, concurrency: int,
             progress: bool = True) -> dict[str, Any]:
    """Answers of `questions` in `mode` (cached ones reused), `concurrency` requests in flight.
    Returns question id → record (text, mode, server timings, client latency, ensemble ...)."""
    done = load_cache(path)
    todo = [q for q in questions if q["id"] not in done]
    if not todo:
        return done
    server.pipeline.eager = eager
    path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), desc=f"answers: {phase}", unit="answer", disable=not progress)

    errors: list[str] = []

    async def run() -> None:
        gate = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_S) as client:
            async def one(q: dict[str, Any]) -> None:
                async with gate:
                    for attempt in range(2):  # a server error is retried once
                        t0 = time.perf_counter()
                        r = await client.post("/v1/progressive", json={
                            "question": q["question"], "mode": mode,
                            "max_tokens": max_tokens, "max_points": max_points,
                            "stream": False})
                        if r.status_code < 500 or attempt:
                            break
                        errors.append(f"{q['id']}: {r.status_code}")
                    r.raise_for_status()
                    done[q["id"]] = {**_record(r.json(), time.perf_counter() - t0),
                                     "finished_at": time.time()}  # wall clock (run order)
                    path.write_text(json.dumps(done, indent=1))  # kept as each one lands
                    bar.update(1)
            await asyncio.gather(*(one(q) for q in todo))

    t0 = time.perf_counter()
    server.on_loop(run())
    bar.close()
    done.setdefault("_phase_wall_s", {})[str(len(todo))] = time.perf_counter() - t0
    done.setdefault("_retried", []).extend(errors)
    path.write_text(json.dumps(done, indent=1))
    return done
