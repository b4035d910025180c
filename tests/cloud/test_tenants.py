"""API keys → tenants: the keys file, authentication, and a real server that refuses requests
without a valid key (OpenAI's 401 error shape) while the ops endpoints stay open."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pice.cloud.tenants import DEFAULT_TENANT, TenantRegistry, _main, hash_key, new_key
from pice.shared.config import ServeSettings
from pice.shared.errors import AuthenticationError, BadRequestError
from tests.conftest import LiveServer, _free_port

ALICE, BOB = "pk-alice-test-key", "pk-bob-test-key"


def keys_file(tmp: Path, tenants: dict[str, list[str]]) -> Path:
    path = tmp / "keys.json"
    path.write_text(json.dumps({"tenants": tenants}))
    return path


def test_hash_and_new_key() -> None:
    key, stored = new_key()
    assert stored == hash_key(key) and stored.startswith("sha256:") and len(stored) == 71
    assert key not in stored and new_key()[0] != key


def test_open_mode_is_the_default_tenant() -> None:
    reg = TenantRegistry.load(None)
    assert reg.open
    assert reg.authenticate(None).name == DEFAULT_TENANT
    assert reg.authenticate("Bearer anything").name == DEFAULT_TENANT


def test_keys_map_to_tenants(tmp_path: Path) -> None:
    reg = TenantRegistry.load(keys_file(tmp_path, {"alice": [hash_key(ALICE), hash_key("x2")],
                                                   "bob": [hash_key(BOB)]}))
    assert not reg.open
    assert reg.authenticate(f"Bearer {ALICE}").name == "alice"
    assert reg.authenticate("bearer x2").name == "alice"
    assert reg.authenticate(f"Bearer {BOB}").name == "bob"


@pytest.mark.parametrize(("header", "needle"), [
    (None, "missing API key"),
    ("", "missing API key"),
    (f"Basic {ALICE}", "Bearer <key>"),
    ("Bearer ", "Bearer <key>"),
    ("Bearer not-a-key", "invalid API key"),
    (f"Bearer {hash_key(ALICE)}", "invalid API key"),  # the stored hash is not a key
])
def test_bad_keys_are_refused(tmp_path: Path, header: str | None, needle: str) -> None:
    reg = TenantRegistry.load(keys_file(tmp_path, {"alice": [hash_key(ALICE)]}))
    with pytest.raises(AuthenticationError, match=needle) as err:
        reg.authenticate(header)
    assert err.value.status_code == 401


@pytest.mark.parametrize(("body", "needle"), [
    ({"tenants": {"alice": ["sha256:abc"]}}, "64 lowercase hex"),
    ({"tenants": {"alice": ["plaintext-key"]}}, "sha256:"),
    ({"tenants": {"../evil": [hash_key("k")]}}, "tenant name"),
    ({"tenants": {"a": [hash_key("k")], "b": [hash_key("k")]}}, "both 'a' and 'b'"),
    ({"tenants": {}}, "lists no keys"),
    ({"tenant": {}}, "tenants"),
])
def test_bad_keys_file_is_refused(tmp_path: Path, body: dict[str, object], needle: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(body))
    with pytest.raises(BadRequestError, match=needle) as err:
        TenantRegistry.load(path)
    assert err.value.field == "api_keys_file"


def test_missing_keys_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadRequestError, match="cannot read"):
        TenantRegistry.load(tmp_path / "nope.json")


def test_new_key_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["new-key", "acme"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[0].rsplit(" ", 1)[1]
    line = json.loads(out[1].split(":", 1)[1])
    assert line == {"tenants": {"acme": [hash_key(key)]}}
    assert _main(["new-key", "bad/name"]) == 2


@pytest.fixture(scope="module")
def keyed_server(sketch_model_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("keyed")
    settings = ServeSettings(port=_free_port(), cloud_model=str(sketch_model_dir),
                             edge_models=[str(sketch_model_dir)], max_context=1024,
                             default_max_tokens=16, cache_dir=tmp / "cache",
                             api_keys_file=keys_file(tmp, {"alice": [hash_key(ALICE)]}))
    live = LiveServer(settings)
    live.start()
    yield live
    live.stop()


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/progressive"),
    ("GET", "/v1/adapters"),
    ("DELETE", "/v1/adapters/x"),
])
@pytest.mark.parametrize("key", [None, "wrong"])
def test_server_refuses_without_a_valid_key(keyed_server: LiveServer, method: str, path: str,
                                            key: str | None) -> None:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.request(method, keyed_server.url + path, headers=headers, timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["type"] == "authentication_error" and err["code"] == 401
    assert ("missing" if key is None else "invalid") in err["message"]


def test_server_serves_a_valid_key_and_open_ops(keyed_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key=ALICE, max_retries=0)
    assert client.models.list().data
    resp = client.chat.completions.create(
        model="pice", messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
        extra_body={"pice": {"mode": "cloud"}})
    assert resp.model_extra["pice"]["mode"] == "cloud"  # type: ignore[index]
    bad = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for path in ("/health", "/ready", "/metrics"):  # probes and scrapers need no key
        assert httpx.get(keyed_server.url + path, timeout=10).status_code == 200
