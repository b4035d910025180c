"""Per-key rate limits and per-tenant stream caps (429 with Retry-After), the /metrics gauges an
operator needs, and the JSON access log, on a live server with tiny models and API keys. Each
test uses its own keys (buckets are per key); the refill rate is so slow that no bucket refills
during the run, so nothing depends on timing."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from pice.cloud.api.limits import RequestLimits, TokenBuckets
from pice.cloud.metrics import Metrics
from pice.cloud.tenants import TenantRegistry, hash_key
from pice.shared.config import ServeSettings
from tests.conftest import SKETCH_QUESTIONS, LiveServer, _free_port
from tests.edge.agent_procs import wait_for

BURST = 3
KEYS = {"acme": ["a-hold", "a-second", "a-third"], "globex": ["g-other", "g-log"],
        "rl": ["r-one", "r-two"], "ops": ["o-metrics"]}


@pytest.fixture(scope="module")
def server(sketch_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("limits")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"tenants": {t: [hash_key(k) for k in ks]
                                            for t, ks in KEYS.items()}}))
    settings = ServeSettings(port=_free_port(), cloud_model=str(sketch_model_dir),
                             edge_models=[str(sketch_model_dir)], max_context=1024,
                             default_max_tokens=32, cache_dir=tmp / "cache", guard=False,
                             api_keys_file=keys, rate_limit_rps=0.001, rate_limit_burst=BURST,
                             max_streams_per_client=1)
    live = LiveServer(settings)
    live.start()
    yield live
    live.stop()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ask(server: LiveServer, key: str, stream: bool = False) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/progressive", headers=auth(key), timeout=120, json={
        "question": SKETCH_QUESTIONS[0], "max_tokens": 24, "stream": stream})


def gauges(server: LiveServer) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_rate_limit_per_api_key_is_429_with_retry_after(server: LiveServer) -> None:
    for _ in range(BURST):
        assert httpx.get(f"{server.url}/v1/models", headers=auth("r-one")).status_code == 200
    r = httpx.get(f"{server.url}/v1/models", headers=auth("r-one"))
    assert r.status_code == 429, r.text  # before: 200, no limit
    assert int(r.headers["retry-after"]) >= 1
    assert "rate limit" in r.json()["error"]["message"] and r.json()["error"]["code"] == 429
    assert httpx.get(f"{server.url}/v1/models", headers=auth("r-two")).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # never limited
    assert gauges(server)['pice_limited_requests_total{limit="rate"}'] >= 1


def test_concurrent_streams_per_tenant_are_capped(server: LiveServer) -> None:
    url = server.url.removeprefix("http://")
    host, port = url.split(":")
    held = socket.create_connection((host, int(port)), timeout=60)
    try:  # a generation request that stays open: its body never ends
        held.sendall(b"POST /v1/progressive HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a-hold"
                     b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        wait_for("the held request in flight", lambda: gauges(server).get(
            'pice_inflight_requests{endpoint="/v1/progressive"}') == 1)
        r = ask(server, "a-second")  # the same tenant, another key
        assert r.status_code == 429, r.text  # before: ran (no cap)
        assert r.headers["retry-after"] == "1" and "concurrent" in r.json()["error"]["message"]
        assert ask(server, "g-other").status_code == 200  # another tenant is not affected
    finally:
        held.close()
    wait_for("the held request to end", lambda: gauges(server).get(
        'pice_inflight_requests{endpoint="/v1/progressive"}') == 0)
    assert ask(server, "a-third").status_code == 200


def test_metrics_gauges(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/v1/models", headers=auth("o-metrics")).status_code == 200
    g = gauges(server)
    model = str(server.server.config.app.state.settings.cloud_model)  # type: ignore[attr-defined]
    for state in ("used", "free"):
        assert f'pice_kv_blocks{{model="{model}",state="{state}"}}' in g
        assert f'pice_adapter_slots{{model="{model}",state="{state}"}}' in g
    assert g[f'pice_kv_blocks{{model="{model}",state="free"}}'] > 0
    for state in ("running", "waiting"):
        assert f'pice_engine_sequences{{model="{model}",state="{state}"}}' in g
    assert g['pice_inflight_requests{endpoint="/metrics"}'] == 1  # the scrape itself
    assert g['pice_edges{kind="local",state="healthy"}'] == 1
    assert g['pice_edges{kind="remote",state="suspect"}'] == 0
    assert g["pice_edge_batches_inflight"] == 0
    assert "pice_edge_deadlines_missed_total" in g
    assert g["process_resident_memory_bytes"] > 0


def test_access_log_is_one_json_line_per_request(server: LiveServer,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pice.access")
    assert ask(server, "g-log").status_code == 200
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers=auth("g-log"),
                      timeout=120, json={"messages": [{"role": "user",
                                                      "content": SKETCH_QUESTIONS[1]}],
                                         "max_tokens": 16, "stream": True}) as r:
        assert r.status_code == 200 and "[DONE]" in r.read().decode()
    assert httpx.get(f"{server.url}/v1/models", headers=auth("bad-key")).status_code == 401
    lines: list[dict[str, Any]] = wait_for("three access lines", lambda: (ls := [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "pice.access"
        and '"/v1/' in r.getMessage()]) and len(ls) >= 3 and ls)
    prog, chat, bad = lines[:3]
    assert prog["path"] == "/v1/progressive" and prog["status"] == 200
    assert prog["tenant"] == "globex" and prog["mode"] in ("progressive", "cloud")
    assert prog["request_id"].startswith("prog-") and "total" in prog["timings"]
    assert prog["duration_s"] >= prog["ttfb_s"] > 0
    assert chat["path"] == "/v1/chat/completions" and chat["mode"] and chat["timings"]
    assert bad["status"] == 401 and bad["tenant"] is None and "mode" not in bad


def test_token_bucket_refills_at_its_rate() -> None:
    b = TokenBuckets(rate=2.0, burst=2)
    assert b.take("k", now=0.0) == 0 and b.take("k", now=0.0) == 0
    assert b.take("k", now=0.0) == pytest.approx(0.5)  # empty: one token in 1/rate s
    assert b.take("k", now=0.5) == 0  # refilled
    assert b.take("other", now=0.5) == 0  # keys are apart
    assert TokenBuckets(rate=0, burst=1).take("k") == 0  # 0: no limit


class _Echo:
    """A bare ASGI app: 200 at once (so the middleware's own behaviour is what is tested)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("limit_open", [False, True])
def test_open_server_limits_per_client_address_only_when_asked(limit_open: bool) -> None:
    app = RequestLimits(_Echo(), TenantRegistry.load(None), Metrics(), rate=0.001, burst=2,
                        max_streams=1, limit_open_clients=limit_open)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        wait_for("the server", lambda: srv.started)
        codes = [httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code for _ in range(4)]
        assert codes == ([200, 200, 429, 429] if limit_open else [200] * 4)
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
    finally:
        srv.should_exit = True
        thread.join(30)


def test_probes_leave_no_access_line(server: LiveServer,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """A load balancer or `pice ask` polling /ready does not fill the log (lines at DEBUG)."""
    caplog.set_level(logging.INFO, logger="pice.access")
    for path in ("/ready", "/health", "/metrics", "/ready"):
        assert httpx.get(f"{server.url}{path}", timeout=30).status_code == 200
    assert httpx.get(f"{server.url}/v1/models", headers=auth("g-log"),
                     timeout=30).status_code == 200
    wait_for("the /v1/models access line", lambda: any(
        '"/v1/models"' in r.getMessage() for r in caplog.records if r.name == "pice.access"))
    paths = [json.loads(r.getMessage())["path"] for r in caplog.records
             if r.name == "pice.access"]
    assert not {"/ready", "/health", "/metrics"} & set(paths), paths
