"""The packaged 0.5B model, end to end through a real server (marked: slow, needs pice[models])."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from httpx_sse import connect_sse

from pice.shared.config import ServeSettings
from pice.shared.models import DEFAULT_EDGE_MODEL, models_main
from tests.conftest import LiveServer, _free_port

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def real_server() -> Iterator[LiveServer]:
    # The 0.5B model plays both tiers here to keep CI short; `pice serve` uses the 1.5B cloud.
    settings = ServeSettings(port=_free_port(), cloud_model=DEFAULT_EDGE_MODEL,
                             edge_models=[DEFAULT_EDGE_MODEL])
    live = LiveServer(settings)
    live.start(timeout=900)  # first run assembles, verifies and converts the GGUF
    yield live
    live.stop()


def test_packaged_model_verifies() -> None:
    assert models_main("verify", [DEFAULT_EDGE_MODEL], None) == 0


def test_real_question_gets_a_sketch_and_every_point_expanded(real_server: LiveServer) -> None:
    body = {"question": "What are some good ways to reduce stress at work?", "max_tokens": 160,
            "max_points": 4}
    with httpx.Client(base_url=real_server.url, timeout=600) as http, connect_sse(
            http, "POST", "/v1/progressive", json=body) as source:
        events = [(e.event, json.loads(e.data)) for e in source.iter_sse()]
    kinds = [k for k, _ in events]
    assert kinds[0] == "point" and kinds[-1] == "done", kinds  # points stream as written
    points = next(d for k, d in events if k == "sketch")["points"]
    assert [d["text"] for k, d in events if k == "point"] == points
    assert 3 <= len(points) <= 4
    assert all(1 <= len(p.split()) <= 10 for p in points)
    sections = sorted((d for k, d in events if k == "section"), key=lambda s: s["index"])
    assert [s["index"] for s in sections] == list(range(len(points)))  # each point exactly once
    for point, section in zip(points, sections, strict=True):
        body_text = section["text"][len(point):].strip(" :")
        assert len(body_text.split()) >= 3, section["text"]  # a real expansion, not empty
    done = events[-1][1]
    assert done["mode"] == "progressive" and done["tokens"]["edge"] > 0


def test_code_question_goes_full_cloud_in_auto_mode(real_server: LiveServer) -> None:
    r = httpx.post(f"{real_server.url}/v1/chat/completions", timeout=600, json={
        "messages": [{"role": "user", "content": "Write a Python function that squares x."}],
        "max_tokens": 64})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pice"]["mode"] == "cloud"
    assert "def " in body["choices"][0]["message"]["content"]
