"""What a user is offered, through a real server on loopback with two tenants: `pice` and the
models that chat (a base model without a chat template is not offered and is refused by name),
the server's own adapter (as the shipped `pice-expander`: public, read-only), and per-token
log-probabilities in OpenAI's shape, or a 400 saying why not."""

from __future__ import annotations

import json
import math
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from httpx_sse import connect_sse

from pice.cloud.api.app import create_app
from pice.cloud.metrics import Metrics
from pice.cloud.pipeline import Pipeline
from pice.cloud.tenants import hash_key
from pice.runtime import build_pipeline
from pice.shared.config import ServeSettings
from tests.conftest import SKETCH_QUESTIONS, _free_port
from tests.factories import peft_adapter

ALICE, BOB = "pk-alice", "pk-bob"
SHIPPED = "pice-expander"


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class Site:
    def __init__(self, url: str, cloud: str, chat_edge: str, base_edge: str) -> None:
        self.url, self.cloud, self.chat_edge, self.base_edge = url, cloud, chat_edge, base_edge

    def chat(self, key: str = ALICE, **body: Any) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": SKETCH_QUESTIONS[0]}],
                "max_tokens": 12, **body}
        return httpx.post(f"{self.url}/v1/chat/completions", headers=auth(key), json=body,
                          timeout=120)


@pytest.fixture(scope="module")
def site(sketch_model_dir: Path, tiny_model_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("model-list")
    base = tmp / "base-model"  # the tiny model without its chat template, like gemma-3-270m
    shutil.copytree(tiny_model_dir, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    shipped = peft_adapter(tiny_model_dir, tmp / "shipped", rank=4, seed=7)
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"tenants": {"alice": [hash_key(ALICE)],
                                            "bob": [hash_key(BOB)]}}))
    settings = ServeSettings(port=_free_port(), cloud_model=str(sketch_model_dir),
                             edge_models=[str(tiny_model_dir), str(base)], max_context=1024,
                             default_max_tokens=16, cache_dir=tmp / "cache",
                             api_keys_file=keys, state_dir=tmp / "state")

    def builder(s: ServeSettings, metrics: Metrics) -> Pipeline:
        pipeline = build_pipeline(s, metrics)  # then what the runtime does with a shipped one
        pipeline.edge_generators[str(tiny_model_dir)].add_adapter(SHIPPED, shipped)
        return pipeline

    server = uvicorn.Server(uvicorn.Config(create_app(settings, builder), host="127.0.0.1",
                                           port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    ready = threading.Event()
    while thread.is_alive() and not ready.wait(0.1):
        try:
            r = httpx.get(f"{url}/ready", timeout=30)
        except httpx.TransportError:
            continue
        assert r.json()["status"] != "failed", r.text
        if r.status_code == 200:
            ready.set()
    assert ready.is_set(), "server thread died"
    yield Site(url, str(sketch_model_dir), str(tiny_model_dir), str(base))
    server.should_exit = True
    thread.join(timeout=30)


def test_models_lists_pice_and_what_chats(site: Site) -> None:
    models = openai.OpenAI(base_url=f"{site.url}/v1", api_key=ALICE, max_retries=0).models.list()
    ids = [m.id for m in models.data]
    assert ids == ["pice", site.cloud, site.chat_edge, SHIPPED]
    assert models.data[-1].model_extra["parent"] == site.chat_edge


def test_a_base_model_is_refused_for_chat(site: Site) -> None:
    r = site.chat(model=site.base_edge)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "model"
    assert "base model without a chat template" in err["message"] and "'pice'" in err["message"]


def test_the_shipped_adapter_is_public_and_read_only(site: Site) -> None:
    for key in (ALICE, BOB):
        listed = httpx.get(f"{site.url}/v1/adapters", headers=auth(key), timeout=30).json()
        [card] = [a for a in listed["data"] if a["id"] == SHIPPED]
        assert card["owner"] == "pice" and card["public"] is True
        assert card["base_model"] == site.chat_edge and card["rank"] == 4
    r = httpx.delete(f"{site.url}/v1/adapters/{SHIPPED}", headers=auth(ALICE), timeout=30)
    assert r.status_code == 403 and "read-only" in r.json()["error"]["message"], r.text
    assert httpx.get(f"{site.url}/v1/adapters/{SHIPPED}", headers=auth(BOB),
                     timeout=30).status_code == 200
    r = httpx.post(f"{site.url}/v1/adapters", headers=auth(ALICE), timeout=30,
                   json={"name": SHIPPED, "path": "/nowhere"})
    assert r.status_code == 400 and "reserved" in r.json()["error"]["message"], r.text
    r = site.chat(model=SHIPPED)
    assert r.status_code == 200, r.text
    assert r.json()["pice"]["mode"] == "edge"
    assert r.json()["pice"]["adapter"]["name"] == SHIPPED


def _joined(content: list[dict[str, Any]]) -> str:
    return "".join(t["token"] for t in content)


@pytest.mark.parametrize("model", ["pice", "chat-edge"])
def test_logprobs_per_token(site: Site, model: str) -> None:
    name = site.chat_edge if model == "chat-edge" else model
    r = site.chat(model=name, logprobs=True, top_logprobs=0)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    content = choice["logprobs"]["content"]
    assert content and _joined(content) == choice["message"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for t in content:
        assert t["logprob"] <= 0 and math.isfinite(t["logprob"]), t
        assert bytes(t["bytes"]).decode() == t["token"] and t["top_logprobs"] == []
    assert body["pice"]["mode"] == ("edge" if model == "chat-edge" else "cloud")
    if model == "pice":  # auto → cloud: one model writes the whole answer
        assert "logprobs" in body["pice"]["reason"]


@pytest.mark.parametrize("model", ["pice", "chat-edge"])
def test_top_logprobs(site: Site, model: str) -> None:
    """Greedy: the chosen token is the likeliest of its step, with the same log-probability."""
    name = site.chat_edge if model == "chat-edge" else model
    r = site.chat(model=name, logprobs=True, top_logprobs=3)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content
    for t in content:
        top = t["top_logprobs"]
        assert len(top) == 3 and [x["logprob"] for x in top] == sorted(
            (x["logprob"] for x in top), reverse=True)
        assert top[0]["logprob"] == pytest.approx(t["logprob"], abs=1e-6)
        assert sum(math.exp(x["logprob"]) for x in top) <= 1 + 1e-5


def test_logprobs_through_the_openai_client_plain_and_streamed(site: Site) -> None:
    client = openai.OpenAI(base_url=f"{site.url}/v1", api_key=ALICE, max_retries=0)
    msgs: Any = [{"role": "user", "content": SKETCH_QUESTIONS[1]}]
    plain = client.chat.completions.create(model="pice", messages=msgs, max_tokens=10,
                                           logprobs=True, top_logprobs=2)
    assert plain.choices[0].logprobs is not None
    tokens = plain.choices[0].logprobs.content or []
    streamed = []
    for chunk in client.chat.completions.create(model="pice", messages=msgs, max_tokens=10,
                                                logprobs=True, top_logprobs=2, stream=True):
        lp = chunk.choices[0].logprobs if chunk.choices else None
        streamed += lp.content or [] if lp is not None else []
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in tokens]
    assert all(len(t.top_logprobs) == 2 for t in streamed)
    assert "".join(t.token for t in tokens) == plain.choices[0].message.content


@pytest.mark.parametrize(("body", "param", "needle"), [
    ({"top_logprobs": 0}, "top_logprobs", "needs logprobs: true"),
    ({"logprobs": True, "pice": {"mode": "progressive"}}, "logprobs", "one model"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal"),
])
def test_logprobs_that_cannot_be_honoured_are_a_400(site: Site, body: dict[str, Any],
                                                    param: str, needle: str) -> None:
    r = site.chat(**body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


def test_progressive_stream_is_unchanged_without_logprobs(site: Site) -> None:
    with httpx.Client(timeout=120) as http, connect_sse(
            http, "POST", f"{site.url}/v1/chat/completions", headers=auth(ALICE),
            json={"model": "pice", "stream": True, "max_tokens": 12,
                  "messages": [{"role": "user", "content": SKETCH_QUESTIONS[0]}]}) as src:
        chunks = [sse.data for sse in src.iter_sse()]
    assert chunks[-1] == "[DONE]"
    assert all("logprobs" not in json.loads(c)["choices"][0] for c in chunks[:-1])
