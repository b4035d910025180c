"""The scheduler through the real server: `auto` runs the dynamic policy over the MiniLM router,
the decision's reason reaches the client and /metrics, priority is validated."""

import httpx
import pytest

from tests.conftest import SKETCH_QUESTIONS, LiveServer


def ask(server: LiveServer, question: str, **pice: object) -> dict:
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": question}], "max_tokens": 60, "pice": pice})
    assert r.status_code == 200, r.text
    return r.json()["pice"]


def test_auto_decisions_are_explained_and_counted(server: LiveServer) -> None:
    sketched = ask(server, SKETCH_QUESTIONS[1], mode="auto", priority="batch")
    assert sketched["mode"] == "progressive"
    assert sketched["reason"].startswith("sketch (p=")
    full = ask(server, "Write a Python function that reverses a linked list.", mode="auto")
    assert full["mode"] == "cloud"
    assert full["reason"].startswith("question does not suit a sketch (p=0.")
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'pice_decisions_total{mode="cloud",reason="unsuited"}' in metrics
    assert 'pice_decisions_total{mode="progressive",reason="suited"}' in metrics


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "pice": {"priority": "urgent"}},
     "pice.priority"),
    ("/v1/progressive", {"question": "hi", "priority": "now"}, "priority"),
])
def test_bad_priority_is_a_400_naming_it(server: LiveServer, path: str, body: dict,
                                          param: str) -> None:
    r = httpx.post(f"{server.url}{path}", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert "interactive" in r.json()["error"]["message"]
