"""The API through a real uvicorn server on loopback: the official openai client (plain and
streaming), httpx for the SSE endpoint and the bad-input table."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from httpx_sse import connect_sse

from tests.conftest import SKETCH_QUESTIONS, LiveServer


def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_progressive_plain(server: LiveServer) -> None:
    resp = client(server).chat.completions.create(
        model="pice", messages=[{"role": "user", "content": SKETCH_QUESTIONS[0]}],
        max_tokens=60, extra_body={"pice": {"mode": "progressive"}})
    report = resp.model_extra["pice"]  # type: ignore[index]
    assert report["mode"] == "progressive"
    assert report["sketch"] == ["Fixed sleep schedule", "Dark quiet bedroom", "No screens late"]
    lines = resp.choices[0].message.content.splitlines()  # type: ignore[union-attr]
    assert [line.split(":")[0] for line in lines] == [
        "1. Fixed sleep schedule", "2. Dark quiet bedroom", "3. No screens late"]
    assert report["tokens"]["edge"] > 0 and report["tokens"]["cloud"] > 0
    assert set(report["timings"]) >= {"sketch", "expansion", "total", "ttft"}
    assert resp.usage.completion_tokens == report["tokens"]["cloud"] + report["tokens"]["edge"]


def test_openai_cloud_stream_equals_plain(server: LiveServer) -> None:
    kwargs = {"model": "pice", "messages": [{"role": "user", "content": "Hello there"}],
              "max_tokens": 12, "extra_body": {"pice": {"mode": "cloud"}}}
    plain = client(server).chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(client(server).chat.completions.create(stream=True, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].model_extra["pice"]["mode"] == "cloud"  # type: ignore[index]


def test_openai_progressive_stream(server: LiveServer) -> None:
    chunks = list(client(server).chat.completions.create(
        model="pice", messages=[{"role": "user", "content": SKETCH_QUESTIONS[1]}],
        max_tokens=60, stream=True, extra_body={"pice": {"mode": "progressive"}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("1. Fixed sleep schedule")
    assert "\n3. No screens late" in text
    # the first point's title streams alone, as soon as its sketch line is complete; the rest
    # of its section follows
    contents = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert contents[0] == "1. Fixed sleep schedule"
    titles = ["Fixed sleep schedule", "Dark quiet bedroom", "No screens late"]
    lines = text.split("\n")
    assert len(lines) == 3 and all(
        line.startswith(f"{i + 1}. {t}") and line[len(f"{i + 1}. {t}"):][:1] in (":", ".")
        for i, (line, t) in enumerate(zip(lines, titles, strict=True)))


def test_models_list(server: LiveServer, sketch_model_dir: Path) -> None:
    """`pice` first (the name every example uses), then the cloud model (also the edge here)."""
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["pice", str(sketch_model_dir)]


def test_progressive_sse_events(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http, connect_sse(
            http, "POST", "/v1/progressive",
            json={"question": SKETCH_QUESTIONS[0], "max_tokens": 60}) as source:
        events = [(e.event, json.loads(e.data)) for e in source.iter_sse()]
    kinds = [k for k, _ in events]
    # each point as its sketch line completes, the whole sketch, the sections as they are
    # decided (eager dispatch: possibly before the sketch ends, never before their point)
    assert kinds[0] == "point" and kinds[-1] == "done"
    assert sorted(kinds[:-1]) == ["point"] * 3 + ["section"] * 3 + ["sketch"]
    points = [d for k, d in events if k == "point"]
    assert [(p["index"], p["text"]) for p in points] == [
        (0, "Fixed sleep schedule"), (1, "Dark quiet bedroom"), (2, "No screens late")]
    sketch = next(d for k, d in events if k == "sketch")
    assert sketch["points"] == ["Fixed sleep schedule", "Dark quiet bedroom", "No screens late"]
    assert kinds.index("sketch") > max(i for i, k in enumerate(kinds) if k == "point")
    for i, (k, d) in enumerate(events):
        if k == "section":
            assert events.index(("point", points[d["index"]])) < i
    sections = sorted((d for k, d in events if k == "section"), key=lambda s: s["index"])
    assert [s["index"] for s in sections] == [0, 1, 2]  # each arrives when done, any order
    assert all(s["worker"] == "edge-0" and s["logprob"] <= 0 for s in sections)
    done = events[-1][1]
    assert done["mode"] == "progressive"
    assert done["text"] == "\n".join(f"{s['index'] + 1}. {s['text']}" for s in sections)


def test_progressive_json_when_not_streaming(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/v1/progressive", timeout=60,
                   json={"question": SKETCH_QUESTIONS[0], "max_tokens": 60, "stream": False})
    assert r.status_code == 200
    body = r.json()
    assert len(body["sections"]) == 3 and body["mode"] == "progressive"


def test_ops_endpoints(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'pice_requests_total{endpoint="progressive",mode="progressive"}' in metrics
    assert "pice_stage_seconds_bucket" in metrics
    assert 'pice_tokens_total{tier="edge"}' in metrics


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("path", "body", "param", "needle"), [
    ("/v1/chat/completions", {"messages": []}, "messages", "at least one message"),
    ("/v1/chat/completions", {}, "messages", "Field required"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, "messages",
     "empty content"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, "messages",
     "user message"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]},
     "messages.0.role", "robot"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 0}, "max_tokens", "greater"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 5000}, "max_tokens",
     "context limit"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": 9}, "temperature", "less"),
    ("/v1/chat/completions", {"messages": MSG, "pice": {"mode": "fast"}}, "pice.mode", "fast"),
    ("/v1/chat/completions", {"messages": MSG, "pice": {"max_points": 50}}, "pice.max_points",
     "less"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 1100}]},
     "messages", "context limit"),
    ("/v1/chat/completions", {"messages": MSG, "n": 2}, "n", "less"),
    ("/v1/progressive", {}, "body", "exactly one of question or messages"),
    ("/v1/progressive", {"question": ""}, "body", "question is empty"),
    ("/v1/progressive", {"question": "hi", "mode": "fast"}, "mode", "fast"),
    ("/v1/progressive", {"question": "hi", "colour": 1}, "colour", "Extra inputs"),
])
def test_bad_input_is_a_4xx_naming_the_field(server: LiveServer, path: str, body: dict,
                                             param: str, needle: str) -> None:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert needle in err["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]"])
def test_malformed_json_is_a_400(server: LiveServer, raw: bytes) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", content=raw, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_sees_bad_request(server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError, match="context limit"):
        client(server).chat.completions.create(model="pice", messages=MSG, max_tokens=5000)


def test_unknown_route_is_404(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404


def test_concurrent_requests_all_complete(server: LiveServer) -> None:
    """Progressive and cloud requests at once share the engine's steps; none is lost."""
    from concurrent.futures import ThreadPoolExecutor

    def progressive(q: str) -> dict:
        r = httpx.post(f"{server.url}/v1/progressive", timeout=120,
                       json={"question": q, "max_tokens": 60, "stream": False})
        assert r.status_code == 200, r.text
        return r.json()

    def cloud(_: str) -> str:
        return client(server).chat.completions.create(
            model="pice", messages=[{"role": "user", "content": "Hello there"}], max_tokens=10,
            extra_body={"pice": {"mode": "cloud"}}).choices[0].message.content or ""

    with ThreadPoolExecutor(6) as pool:
        prog = [pool.submit(progressive, q) for q in SKETCH_QUESTIONS * 2]
        plain = [pool.submit(cloud, "") for _ in range(2)]
        bodies = [f.result(timeout=180) for f in prog]
        texts = [f.result(timeout=180) for f in plain]
    assert all(b["mode"] == "progressive" and len(b["sections"]) == 3 for b in bodies)
    assert texts[0] == texts[1]  # greedy: concurrency does not change an answer
