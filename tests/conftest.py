"""Shared fixtures: tiny models (built once per session) and a real uvicorn server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from pice.cloud.api.app import create_app
from pice.cloud.sketcher import sketch_messages
from pice.runtime import build_pipeline
from pice.shared.config import ServeSettings
from pice.shared.hf_backend import HFGenerator
from tests.factories import tiny_qwen2, train_to_sketch

# Questions the tiny sketch model was trained on (the API tests ask these).
SKETCH_QUESTIONS = ["How can I sleep better?", "What helps me focus at work?"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="session")
def sketch_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained to answer the sketch prompt of SKETCH_QUESTIONS with an outline."""
    d = tiny_qwen2(tmp_path_factory.mktemp("tiny-sketcher"))
    gen = HFGenerator(str(d))
    defaults = ServeSettings()
    prompts = [gen.render_chat(sketch_messages(q, defaults.default_max_points,
                                               defaults.words_per_point))
               for q in SKETCH_QUESTIONS]
    return train_to_sketch(d, prompts)


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_dir: Path) -> HFGenerator:
    return HFGenerator(str(tiny_model_dir), max_context=1024)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    def __init__(self, settings: ServeSettings) -> None:
        self.url = f"http://127.0.0.1:{settings.port}"
        app = create_app(settings, build_pipeline)
        config = uvicorn.Config(app, host="127.0.0.1", port=settings.port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 1800) -> None:
        """Wait until the models are loaded: as long as the server is alive and says it is
        loading (a busy machine loads slowly; that is no failure), ending early when it reports
        a load error or its thread dies. `timeout` only guards against a hang."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.thread.is_alive():
            try:
                r = httpx.get(f"{self.url}/ready", timeout=30)
                if r.status_code == 200:
                    return
                if r.json().get("status") == "failed":
                    raise RuntimeError(f"server at {self.url} failed to load: {r.text}")
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server at {self.url} not ready (thread alive: "
                           f"{self.thread.is_alive()}) after {timeout}s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def server(sketch_model_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = ServeSettings(port=_free_port(), cloud_model=str(sketch_model_dir),
                             edge_models=[str(sketch_model_dir)], max_context=1024,
                             default_max_tokens=64,
                             cache_dir=tmp_path_factory.mktemp("cache"),
                             # API tests check the edge's sections as written; the quality
                             # guard's rewrites are tested in tests/cloud/test_guard.py
                             guard=False)
    live = LiveServer(settings)
    live.start()
    yield live
    live.stop()
