"""Tenants' adapters through a real server on loopback: upload, isolation between tenants,
answers token-exact against peft, automatic selection, bad uploads refused with nothing left
behind, delete returning the engine's memory, and the catalog restored after a restart."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pice.cloud.adapter_catalog import AdapterCard, AdapterCatalog
from pice.cloud.tenants import Tenant, hash_key
from pice.scheduler.adapter_router import AdapterRouter
from pice.shared.config import ServeSettings
from pice.shared.embeddings import get_embedder
from pice.shared.engine.generator import EngineGenerator
from pice.shared.errors import ConflictError
from pice.shared.hf_backend import HFGenerator
from tests.conftest import SKETCH_QUESTIONS, LiveServer, _free_port
from tests.factories import peft_adapter, peft_greedy

ALICE, BOB = "pk-alice", "pk-bob"
SQL_CARD = {"description": "Writes SQL queries and designs relational database schemas.",
            "examples": ["Join the orders and customers tables", "Why is my SELECT slow?"]}
COOK_CARD = {"description": "Home cooking: recipes, baking, ingredient substitutions.",
             "examples": ["How long do I roast potatoes?", "What can replace eggs in a cake?"]}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def upload(url: str, key: str, name: str, adapter: Path, card: dict[str, Any] | None = None,
           **form: Any) -> httpx.Response:
    card = card or {}
    data = {"name": name, "description": card.get("description", ""),
            "examples": card.get("examples", []), **form}
    files = {"adapter_config": ("adapter_config.json",
                                (adapter / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors",
                               (adapter / "adapter_model.safetensors").read_bytes())}
    return httpx.post(f"{url}/v1/adapters", headers=auth(key), data=data, files=files,
                      timeout=60)


def chat(url: str, key: str, model: str, content: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": 12, **extra}
    return httpx.post(f"{url}/v1/chat/completions", headers=auth(key), json=body, timeout=120)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("adapters")
    return {"sql": peft_adapter(tiny_model_dir, d / "sql", rank=4, seed=1),
            "cook": peft_adapter(tiny_model_dir, d / "cook", rank=8, seed=2,
                                 targets=("q_proj", "k_proj", "v_proj", "o_proj")),
            "mlp": peft_adapter(tiny_model_dir, d / "mlp", rank=2, seed=3,
                                targets=("gate_proj", "up_proj", "down_proj"))}


@pytest.fixture(scope="module")
def site(sketch_model_dir: Path, tiny_model_dir: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, Path]]:
    tmp = tmp_path_factory.mktemp("tenants-site")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"tenants": {"alice": [hash_key(ALICE)],
                                            "bob": [hash_key(BOB)]}}))
    (tmp / "imports").mkdir()
    settings = ServeSettings(port=_free_port(), cloud_model=str(sketch_model_dir),
                             edge_models=[str(tiny_model_dir)], max_context=1024,
                             default_max_tokens=16, cache_dir=tmp / "cache",
                             api_keys_file=keys, state_dir=tmp / "state",
                             adapter_import_dirs=[tmp / "imports"], adapter_upload_mb=1)
    live = LiveServer(settings)
    live.start()
    yield live, tmp
    live.stop()


@pytest.fixture(scope="module")
def url(site: tuple[LiveServer, Path], adapters: dict[str, Path]) -> str:
    """The server with alice's private `sql` and public `cook` adapters uploaded."""
    live = site[0]
    r = upload(live.url, ALICE, "sql", adapters["sql"], SQL_CARD)
    assert r.status_code == 201, r.text
    r = upload(live.url, ALICE, "cook", adapters["cook"], COOK_CARD, public="true")
    assert r.status_code == 201, r.text
    return live.url


def edge_gen(site: tuple[LiveServer, Path]) -> EngineGenerator:
    app = site[0].server.config.app
    [gen] = app.state.pipeline.edge_generators.values()
    assert isinstance(gen, EngineGenerator)
    return gen


def reference_text(base: Path, adapter: Path | None, content: str, max_new: int = 12) -> str:
    """peft's greedy completion, decoded as the server decodes. A stream emits whole characters
    only, so a trailing partial UTF-8 character (U+FFFD) is not part of the answer."""
    ref = HFGenerator(str(base))
    prompt = ref.render_chat([{"role": "user", "content": content}])
    ids = peft_greedy(base, adapter, prompt, max_new)
    return ref.chat.decode(ids).rstrip("\ufffd")


def test_upload_reports_the_engine_view(url: str) -> None:
    body = httpx.get(f"{url}/v1/adapters/sql", headers=auth(ALICE), timeout=10).json()
    assert body["id"] == "sql" and body["owner"] == "alice" and not body["public"]
    assert body["rank"] == 4 and body["alpha"] == 8.0
    assert body["target_modules"] == ["q_proj", "v_proj"] and body["size_bytes"] > 0
    assert body["tier"] in ("disk", "host", "device") and body["error"] is None
    assert body["description"] == SQL_CARD["description"]
    assert body["examples"] == SQL_CARD["examples"]


def test_tenants_see_only_their_own_and_public(url: str, tiny_model_dir: Path) -> None:
    mine = httpx.get(f"{url}/v1/adapters", headers=auth(ALICE), timeout=10).json()["data"]
    assert {a["id"] for a in mine} >= {"sql", "cook"}
    theirs = httpx.get(f"{url}/v1/adapters", headers=auth(BOB), timeout=10).json()["data"]
    assert "alice/cook" in {a["id"] for a in theirs}
    assert not [a for a in theirs if a["name"] == "sql"]
    for ref in ("sql", "alice/sql"):  # a private adapter does not exist for anyone else
        r = httpx.get(f"{url}/v1/adapters/{ref}", headers=auth(BOB), timeout=10)
        assert r.status_code == 404 and "no model or adapter" in r.json()["error"]["message"]
        assert chat(url, BOB, ref, "hi").status_code == 404
        assert httpx.delete(f"{url}/v1/adapters/{ref}", headers=auth(BOB),
                            timeout=10).status_code == 404
    r = httpx.delete(f"{url}/v1/adapters/alice/cook", headers=auth(BOB), timeout=10)
    assert r.status_code == 403  # visible, but only its owner deletes it
    models = openai.OpenAI(base_url=f"{url}/v1", api_key=BOB, max_retries=0).models.list()
    ids = {m.id: m for m in models.data}
    assert "sql" not in ids and "alice/sql" not in ids
    assert (ids["alice/cook"].model_extra or {})["parent"] == str(tiny_model_dir)
    alice = openai.OpenAI(base_url=f"{url}/v1", api_key=ALICE, max_retries=0).models.list()
    parents = {m.id: (m.model_extra or {}).get("parent") for m in alice.data}
    assert parents["sql"] == parents["cook"] == str(tiny_model_dir)
    assert parents[str(tiny_model_dir)] is None  # the edge model itself


def test_two_tenants_may_reuse_a_name(url: str, adapters: dict[str, Path]) -> None:
    r = upload(url, BOB, "sql", adapters["mlp"])
    assert r.status_code == 201, r.text
    assert r.json()["owner"] == "bob" and r.json()["rank"] == 2
    assert httpx.get(f"{url}/v1/adapters/sql", headers=auth(ALICE),
                     timeout=10).json()["rank"] == 4
    assert httpx.delete(f"{url}/v1/adapters/sql", headers=auth(BOB),
                        timeout=10).status_code == 200
    assert httpx.get(f"{url}/v1/adapters/sql", headers=auth(ALICE),
                     timeout=10).status_code == 200


def test_adapter_as_model_is_token_exact_against_peft(url: str, tiny_model_dir: Path,
                                                      adapters: dict[str, Path]) -> None:
    question = "How can I sleep better?"
    want = reference_text(tiny_model_dir, adapters["sql"], question)
    assert want != reference_text(tiny_model_dir, None, question)  # the adapter matters
    r = chat(url, ALICE, "sql", question)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == want
    assert body["model"] == "sql"
    report = body["pice"]
    assert report["mode"] == "edge" and report["tokens"]["cloud"] == 0
    assert report["adapter"] == {"name": "sql", "selected_by": "request"}
    # streamed, through the official client: the same text; bob uses the public one by name
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=ALICE, max_retries=0)
    chunks = list(client.chat.completions.create(
        model="sql", messages=[{"role": "user", "content": question}], max_tokens=12,
        stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    cook = reference_text(tiny_model_dir, adapters["cook"], question)
    r = chat(url, BOB, "cook", question)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == cook
    assert r.json()["pice"]["adapter"]["name"] == "alice/cook"


def test_automatic_selection_on_the_edge_model(url: str, tiny_model_dir: Path) -> None:
    edge = str(tiny_model_dir)
    sql_q = "Write a query that joins the customers and invoices tables"
    rep = chat(url, ALICE, edge, sql_q).json()["pice"]["adapter"]
    assert rep["name"] == "sql" and rep["selected_by"] == "aas" and rep["score"] > 0.2
    rep = chat(url, ALICE, edge, "Give me a recipe for banana bread").json()["pice"]["adapter"]
    assert rep["name"] == "cook" and rep["selected_by"] == "aas"
    rep = chat(url, BOB, edge, sql_q).json()["pice"]["adapter"]  # alice's private sql: unseen
    assert rep["name"] is None and rep["best"] != "alice/sql"
    rep = chat(url, BOB, edge, "Give me a recipe for banana bread").json()["pice"]["adapter"]
    assert rep["name"] == "alice/cook"
    rep = chat(url, ALICE, edge, "Who painted the Mona Lisa?").json()["pice"]["adapter"]
    assert rep["name"] is None and rep["selected_by"] == "aas"  # nothing close: base model
    body = chat(url, ALICE, edge, sql_q, pice={"adapter": "none"}).json()
    assert body["pice"]["adapter"] == {"name": None, "selected_by": "request"}
    auto = chat(url, ALICE, edge, sql_q).json()["choices"][0]["message"]["content"]
    named = chat(url, ALICE, "sql", sql_q).json()["choices"][0]["message"]["content"]
    assert auto == named != body["choices"][0]["message"]["content"]


def test_progressive_expansions_use_the_named_adapter(site: tuple[LiveServer, Path],
                                                      url: str) -> None:
    stats = edge_gen(site).engine.pool.stats

    def run(adapter: str) -> tuple[dict[str, Any], int]:
        before = stats["hits"] + stats["misses"]  # sequences that ran with an adapter
        r = chat(url, ALICE, "pice", SKETCH_QUESTIONS[0], max_tokens=60,
                 pice={"mode": "progressive", "adapter": adapter})
        assert r.status_code == 200, r.text
        return dict(r.json()["pice"]), stats["hits"] + stats["misses"] - before

    (with_sql, used), (base, unused) = run("sql"), run("none")
    assert with_sql["mode"] == "progressive" and with_sql["tokens"]["edge"] > 0
    assert with_sql["adapter"] == {"name": "sql", "selected_by": "request"}
    assert used == len(with_sql["sketch"]) == 3  # every expansion ran with the adapter
    assert base["adapter"] is None and unused == 0


def test_native_progressive_endpoint_takes_an_adapter(site: tuple[LiveServer, Path],
                                                      url: str) -> None:
    stats = edge_gen(site).engine.pool.stats
    before = stats["hits"] + stats["misses"]
    r = httpx.post(f"{url}/v1/progressive", headers=auth(BOB), timeout=120, json={
        "question": SKETCH_QUESTIONS[1], "max_tokens": 60, "stream": False, "adapter": "cook"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == {"name": "alice/cook", "selected_by": "request"}
    assert stats["hits"] + stats["misses"] - before == len(body["sketch"]) == 3
    r = httpx.post(f"{url}/v1/progressive", headers=auth(BOB), timeout=30,
                   json={"question": "hi", "adapter": "sql"})  # alice's private one
    assert r.status_code == 404 and r.json()["error"]["param"] == "adapter"


def test_delete_returns_the_engines_memory(site: tuple[LiveServer, Path], url: str,
                                           adapters: dict[str, Path]) -> None:
    gen = edge_gen(site)
    pool = gen.engine.pool
    host_before = pool.host_used
    assert upload(url, ALICE, "tmp", adapters["cook"]).status_code == 201
    assert chat(url, ALICE, "tmp", "hello").status_code == 200
    assert "alice/tmp" in gen.resident_adapters() and "alice/tmp" in pool.on_host()
    assert pool.host_used > host_before
    assert httpx.get(f"{url}/v1/adapters/tmp", headers=auth(ALICE),
                     timeout=10).json()["tier"] == "device"
    r = httpx.delete(f"{url}/v1/adapters/tmp", headers=auth(ALICE), timeout=10)
    assert r.status_code == 200 and r.json() == {"id": "tmp", "object": "adapter",
                                                 "deleted": True}
    assert "alice/tmp" not in gen.resident_adapters()
    assert "alice/tmp" not in pool.on_host() and pool.host_used == host_before
    assert "alice/tmp" not in {a.name for a in gen.adapters()}
    assert httpx.get(f"{url}/v1/adapters/tmp", headers=auth(ALICE),
                     timeout=10).status_code == 404
    assert chat(url, ALICE, "tmp", "hello").status_code == 404


def test_register_a_server_local_directory(site: tuple[LiveServer, Path], url: str,
                                           tiny_model_dir: Path) -> None:
    src = peft_adapter(tiny_model_dir, site[1] / "imports" / "local", rank=3, seed=5)
    r = httpx.post(f"{url}/v1/adapters", headers=auth(BOB), timeout=60,
                   json={"name": "local", "path": str(src), "description": "from disk"})
    assert r.status_code == 201, r.text
    assert r.json()["rank"] == 3 and r.json()["owner"] == "bob"
    assert (src / "adapter_model.safetensors").exists()  # copied, the source is left alone
    assert httpx.delete(f"{url}/v1/adapters/local", headers=auth(BOB),
                        timeout=10).status_code == 200
    assert (src / "adapter_model.safetensors").exists()


def _corrupt(tmp: Path, good: Path) -> Path:
    d = tmp / "corrupt"
    d.mkdir()
    (d / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
    (d / "adapter_model.safetensors").write_bytes(b"\x80\x04not safetensors at all")
    return d


@pytest.mark.parametrize(("case", "status", "param", "needle"), [
    ("missing-file", 400, "adapter_model", "missing file field"),
    ("bad-name", 400, "name", "should match pattern"),
    ("duplicate", 409, "name", "already have"),
    ("reserved", 400, "name", "reserved"),
    ("pickle-name", 400, "adapter_model", "pickle"),
    ("corrupt", 400, None, "adapter"),
    ("rank", 400, None, "rank"),
    ("base", 400, "base_model", "not an edge model"),
    ("extra-field", 400, "colour", "Extra inputs"),
    ("too-big", 413, "adapter_model", "limit"),
    ("json-outside", 400, "path", "not under an allowed import directory"),
    ("json-no-path", 400, "path", "needs path"),
    ("content-type", 400, "content-type", "multipart/form-data"),
    ("no-key", 401, None, "missing API key"),
])
def test_bad_uploads_are_refused_and_leave_nothing(
        site: tuple[LiveServer, Path], url: str, adapters: dict[str, Path],
        tiny_model_dir: Path, tmp_path: Path, case: str, status: int, param: str | None,
        needle: str) -> None:
    good = adapters["mlp"]
    v1 = f"{url}/v1/adapters"
    files = {"adapter_config": ("adapter_config.json",
                                (good / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors",
                               (good / "adapter_model.safetensors").read_bytes())}
    if case == "missing-file":
        r = httpx.post(v1, headers=auth(ALICE), data={"name": "x"},
                       files={"adapter_config": files["adapter_config"]})
    elif case in ("bad-name", "duplicate", "reserved"):
        name = {"bad-name": "../etc", "duplicate": "sql", "reserved": "pice"}[case]
        r = upload(url, ALICE, name, good)
    elif case == "pickle-name":
        r = httpx.post(v1, headers=auth(ALICE), data={"name": "p"}, files={
            "adapter_config": files["adapter_config"],
            "adapter_model": ("adapter_model.bin", b"\x80\x04pickle")})
    elif case == "corrupt":
        r = upload(url, ALICE, case, _corrupt(tmp_path, good))
    elif case == "rank":  # over the engine's maximum rank
        r = upload(url, ALICE, case, peft_adapter(tiny_model_dir, tmp_path / "r", rank=100))
    elif case == "base":
        r = upload(url, ALICE, "b", good, base_model="no-such-model")
    elif case == "extra-field":
        r = upload(url, ALICE, "e", good, colour="red")
    elif case == "too-big":
        r = httpx.post(v1, headers=auth(ALICE), data={"name": "big"}, files={
            "adapter_config": files["adapter_config"],
            "adapter_model": ("adapter_model.safetensors", b"\0" * (1 << 20) + b"x")})
    elif case == "json-outside":
        r = httpx.post(v1, headers=auth(ALICE), json={"name": "j", "path": str(good)})
    elif case == "json-no-path":
        r = httpx.post(v1, headers=auth(ALICE), json={"name": "j"})
    elif case == "content-type":
        r = httpx.post(v1, headers={**auth(ALICE), "content-type": "text/plain"}, content=b"x")
    else:
        r = httpx.post(v1, data={"name": "k"}, files=files)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["code"] == status
    if param is not None:
        assert err["param"] == param
    # nothing half-written: every stored directory belongs to a catalog record, tmp is empty
    state = site[1] / "state"
    stored = {f"adapters/{d.name}" for d in (state / "adapters").iterdir()}
    saved = json.loads((state / "adapters.json").read_text())["adapters"]
    assert stored == {a["dir"] for a in saved}
    assert not list((state / "tmp").iterdir())
    assert chat(url, ALICE, "sql", "still serving?").status_code == 200


def test_catalog_restores_after_a_restart(tiny_model_dir: Path, adapters: dict[str, Path],
                                          tmp_path: Path) -> None:
    """A new process re-registers every saved adapter; leftovers of a crash are swept."""
    spec = str(tiny_model_dir)
    alice = Tenant("alice")

    def open_catalog(gen: EngineGenerator) -> AdapterCatalog:
        catalog = AdapterCatalog(tmp_path, {spec: gen},
                                 AdapterRouter(lambda t: get_embedder().encode(t)))
        catalog.restore()
        return catalog

    first = open_catalog(EngineGenerator(spec, max_context=256))
    for name in ("sql", "cook"):
        staged = first.tmp_dir / name
        staged.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (staged / f).write_bytes((adapters[name] / f).read_bytes())
        card = AdapterCard(**(SQL_CARD if name == "sql" else COOK_CARD))
        first.register(alice, name, staged, card, False, None)
    (tmp_path / "adapters" / "orphan").mkdir()  # moved in, then the process died
    (first.tmp_dir / "half-written").mkdir()
    gen = EngineGenerator(spec, max_context=256)
    second = open_catalog(gen)
    assert [r.name for r in second.visible(alice)] == ["cook", "sql"]
    assert {a.name for a in gen.adapters()} == {"alice/sql", "alice/cook"}
    assert not (tmp_path / "adapters" / "orphan").exists()
    assert not (tmp_path / "tmp" / "half-written").exists()
    assert second.router.route("SELECT rows joined on a key", ["alice/sql", "alice/cook"],
                               ).adapter == "alice/sql"
    # a stored file damaged while the server was down: that adapter is listed with its error
    # and refused (409); the rest serve
    cook = second.resolve(alice, "cook")
    (tmp_path / cook.dir / "adapter_model.safetensors").write_bytes(b"garbage")
    third = open_catalog(EngineGenerator(spec, max_context=256))
    broken = third.resolve(alice, "cook")
    assert broken.error and third.resolve(alice, "sql").error is None
    with pytest.raises(ConflictError, match="could not be loaded"):
        third.usable(alice, "cook")
    assert third.usable(alice, "sql").name == "sql"


@pytest.mark.parametrize(("model", "pice", "status", "param", "needle"), [
    ("gpt-4", {}, 404, "model", "no model or adapter named 'gpt-4'"),
    ("pice", {"adapter": "nosuch"}, 404, "pice.adapter", "nosuch"),
    ("EDGE", {"adapter": "nosuch"}, 404, "pice.adapter", "nosuch"),
    ("sql", {"adapter": "cook"}, 400, "pice.adapter", "conflicts"),
    ("pice", {"adapter": ""}, 400, "pice.adapter", "at least 1 character"),
])
def test_bad_model_or_adapter_names(url: str, tiny_model_dir: Path, model: str,
                                    pice: dict[str, str], status: int, param: str,
                                    needle: str) -> None:
    model = str(tiny_model_dir) if model == "EDGE" else model
    r = chat(url, ALICE, model, "hi", pice=pice)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"]


def test_edges_listing_needs_a_key_and_hides_other_tenants_adapters(url: str) -> None:
    assert httpx.get(f"{url}/v1/edges", timeout=10).status_code == 401
    assert chat(url, ALICE, "sql", "hi").status_code == 200  # alice/sql now sits in a slot
    seen = {a for e in httpx.get(f"{url}/v1/edges", headers=auth(ALICE), timeout=10)
            .json()["data"] for a in e["adapters"]}
    assert "alice/sql" in seen
    for e in httpx.get(f"{url}/v1/edges", headers=auth(BOB), timeout=10).json()["data"]:
        assert "alice/sql" not in e["adapters"]
