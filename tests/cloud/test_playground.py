"""The browser playground at `/`, end to end in real headless Chromium (Debian's `chromium`,
driven by Playwright; no browser download) against a real tiny-model server on loopback: a
question typed, the sketch and every section seen with the text the server sent, the full-cloud
answer beside it, the edges panel, the API key path. Screenshots go to $PICE_TEST_ARTIFACTS
(default tests/artifacts/). A missing chromium fails the test (CI installs it: .ci/run); set
PICE_NO_BROWSER=1 to skip on a machine without one."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from pice.cloud.tenants import hash_key
from pice.shared.config import ServeSettings
from tests.conftest import SKETCH_QUESTIONS, LiveServer, _free_port

CHROMIUM = Path(os.environ.get("PICE_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("PICE_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parents[1] / "artifacts")
KEY = "pk-playground-test-key"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        if os.environ.get("PICE_NO_BROWSER"):
            pytest.skip(f"PICE_NO_BROWSER set and no chromium at {CHROMIUM}")
        pytest.fail(f"no chromium at {CHROMIUM}: apt-get install chromium (or set PICE_CHROMIUM; "
                    "PICE_NO_BROWSER=1 skips the browser tests)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def sse_events(body: str) -> list[tuple[str, str]]:
    """(event, data) of every event in a server-sent-event body."""
    out = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        name = next((ln[6:].strip() for ln in lines if ln.startswith("event:")), "message")
        data = "\n".join(ln[5:].lstrip(" ") for ln in lines if ln.startswith("data:"))
        if data:
            out.append((name, data))
    return out


# Chromium keeps no body of a text/event-stream response for the DevTools protocol, so the test
# tees the page's POST responses itself: the raw text the browser received, apart from the page's
# own parsing and rendering.
TEE = """
window.__received = {};
const pageFetch = window.fetch;
window.fetch = async (url, init) => {
  const resp = await pageFetch(url, init);
  if (init && init.method === "POST") {
    window.__received[url] = null;
    resp.clone().text().then((t) => { window.__received[url] = t; });
  }
  return resp;
};
"""


def received(page: Page, path: str) -> str:
    page.wait_for_function(f"() => typeof window.__received[{path!r}] === 'string'",
                           timeout=60_000)
    return str(page.evaluate(f"() => window.__received[{path!r}]"))


def deadline_ms(url: str, question: str, key: str | None = None) -> float:
    """A generous wait for one answer in the browser, derived from this machine: 20x the time
    the same request takes through the API (at least two minutes)."""
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/progressive", timeout=600,
                   headers={"Authorization": f"Bearer {key}"} if key else None,
                   json={"question": question, "max_tokens": 60, "stream": False})
    assert r.status_code == 200, r.text
    return max(120.0, 20 * (time.monotonic() - t0)) * 1000


def test_assets_are_local_and_locked_down(server: LiveServer) -> None:
    html = httpx.get(f"{server.url}/", timeout=30)
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in html.headers["content-security-policy"]
    for name, kind in [("playground.js", "text/javascript"), ("playground.css", "text/css"),
                       ("favicon.svg", "image/svg+xml")]:
        r = httpx.get(f"{server.url}/static/{name}", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        text = r.text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # a name, not a fetch
        assert "http://" not in text and "https://" not in text, f"{name} names an address"
    js = httpx.get(f"{server.url}/static/playground.js", timeout=30).text
    assert ".innerHTML" not in js and "insertAdjacentHTML" not in js  # model text: textContent
    assert httpx.get(f"{server.url}/static/../app.py", timeout=30).status_code == 404
    assert httpx.get(f"{server.url}/static/app.py", timeout=30).status_code == 404
    assert "/" not in httpx.get(f"{server.url}/openapi.json", timeout=30).json()["paths"]


def test_question_streams_sketch_sections_cloud_and_edges(server: LiveServer,
                                                          browser: Browser) -> None:
    question = SKETCH_QUESTIONS[0]
    wait = deadline_ms(server.url, question)
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.add_init_script(TEE)
    page.goto(f"{server.url}/")
    expect(page.locator("#server-status")).to_have_attribute("data-state", "ready", timeout=wait)
    expect(page.locator("#edges .edge-item").first).to_be_visible(timeout=wait)
    edges = httpx.get(f"{server.url}/v1/edges", timeout=30).json()["data"]
    shown = page.locator("#edges .edge-item").evaluate_all(
        "items => items.map(i => i.dataset.edge)")
    assert shown == [e["edge_id"] for e in edges] and shown

    page.fill("#question", question)
    page.select_option("#mode", "progressive")
    page.fill("#max-tokens", "60")
    page.click("#ask")
    expect(page.locator("#summary")).to_be_visible(timeout=wait)  # the `done` event arrived
    page.wait_for_function("() => document.querySelector('#ask').disabled === false",
                           timeout=wait)

    events = sse_events(received(page, "/v1/progressive"))
    kinds = [k for k, _ in events]
    assert kinds[-1] == "done", kinds
    done = json.loads(events[-1][1])
    sections = [json.loads(d) for k, d in events if k == "section"]
    assert done["mode"] == "progressive" and len(sections) == len(done["sketch"]) == 3
    items = page.locator("#sections li.section")
    expect(items).to_have_count(3)
    for i, point in enumerate(done["sketch"]):
        item = page.locator(f"#sections li.section[data-index='{i}']")
        assert item.get_attribute("data-state") == "done"
        assert item.get_attribute("data-point") == point
    for s in sections:  # every section as the server sent it, with its source
        item = page.locator(f"#sections li.section[data-index='{s['index']}']")
        expect(item.locator(".text")).to_be_visible()
        assert item.locator(".text").text_content() == s["text"]
        meta = item.locator(".meta").text_content() or ""
        assert s["worker"] in meta and f"{s['tokens']} tok" in meta
        assert "null" not in meta and "undefined" not in meta
        if s["score"] is not None:
            assert f"score {s['score']:.2f}" in meta
    labels = page.locator("#timeline li .what").all_text_contents()
    assert labels[0] == "request sent" and labels[-1] == "done (progressive)"
    assert sum(t.startswith("point ") for t in labels) == 3
    assert sum(t.startswith("section ") for t in labels) == 3
    assert sum(t.startswith("sketch complete") for t in labels) == 1

    page.click("#compare")  # the full-cloud answer beside it, streamed
    expect(page.locator("#cloud-summary")).to_be_visible(timeout=wait)
    streamed = page.locator("#full-cloud").text_content() or ""
    chunks = [json.loads(d) for _, d in sse_events(received(page, "/v1/chat/completions"))
              if d != "[DONE]"]
    sent = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == sent and sent.strip()
    assert chunks[-1]["pice"]["mode"] == "cloud"

    expect(page.locator("#edges .edge-item").first).to_be_visible()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
    outside = [u for u in requested if not u.startswith(server.url)]
    assert not outside, f"the page fetched outside the server: {outside}"
    page.close()


def test_cloud_mode_streams_into_the_answer_panel(server: LiveServer, browser: Browser) -> None:
    wait = deadline_ms(server.url, SKETCH_QUESTIONS[1])
    page = browser.new_page()
    page.add_init_script(TEE)
    page.goto(f"{server.url}/")
    page.fill("#question", "Hello there")
    page.select_option("#mode", "cloud")
    page.fill("#max-tokens", "12")
    page.click("#ask")
    expect(page.locator("#summary")).to_be_visible(timeout=wait)
    events = sse_events(received(page, "/v1/progressive"))
    deltas = "".join(json.loads(d)["text"] for k, d in events if k == "delta")
    assert deltas and page.locator("#cloud-text").text_content() == deltas
    expect(page.locator("#run-mode")).to_have_text("cloud")
    expect(page.locator("#sections li")).to_have_count(0)
    labels = page.locator("#timeline li .what").all_text_contents()
    assert labels == ["request sent", "first cloud token", "done (cloud)"]
    page.close()


@pytest.fixture(scope="module")
def keyed(sketch_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("playground-keys")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"tenants": {"alice": [hash_key(KEY)]}}))
    settings = ServeSettings(port=_free_port(), cloud_model=str(sketch_model_dir),
                             edge_models=[str(sketch_model_dir)], max_context=1024,
                             default_max_tokens=64, cache_dir=tmp / "cache",
                             api_keys_file=keys, state_dir=tmp / "state", guard=False)
    live = LiveServer(settings)
    live.start()
    yield live
    live.stop()


def test_api_key_is_asked_for_then_kept(keyed: LiveServer, browser: Browser) -> None:
    wait = deadline_ms(keyed.url, SKETCH_QUESTIONS[1], KEY)
    page = browser.new_page()
    page.goto(f"{keyed.url}/")
    expect(page.locator("#edges-note")).to_have_text("key needed", timeout=wait)
    page.fill("#question", SKETCH_QUESTIONS[1])
    page.click("#ask")
    expect(page.locator("#notice")).to_contain_text("401", timeout=wait)
    expect(page.locator("#notice")).to_contain_text("API key")

    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.reload()  # the key survives a reload (localStorage)
    expect(page.locator("#api-key")).to_have_value(KEY)
    expect(page.locator("#edges .edge-item").first).to_be_visible(timeout=wait)
    page.fill("#question", SKETCH_QUESTIONS[1])
    page.fill("#max-tokens", "60")
    page.click("#ask")
    expect(page.locator("#summary")).to_be_visible(timeout=wait)
    expect(page.locator("#notice")).to_be_hidden()
    expect(page.locator("#sections li.section[data-state='done']")).to_have_count(3)
    page.close()
