"""Hostile uploads and one tenant's faults, through a real server on loopback: a chunked upload
with no Content-Length is cut off at the cap while it streams; crafted safetensors headers,
non-finite weights, hostile paths and symlinks get a clear 4xx and leave nothing behind; a
config's base_model_name_or_path is never read; and one tenant's degenerate sampling values or
overflowing adapter fail its own requests only, while the other tenant's concurrent requests
are answered exactly."""

from __future__ import annotations

import json
import os
import re
import select
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from pice.bench.lora_adapters import write_adapter
from pice.cloud.tenants import hash_key
from pice.shared.config import ServeSettings
from pice.shared.lora.adapter import ModelShape
from tests.cloud.test_adapters_api import auth, chat, upload
from tests.conftest import LiveServer, _free_port
from tests.shared.lora.test_adapter_hostile import HEADERS, B, N

pytestmark = pytest.mark.fault

ALICE, BOB = "pk-alice", "pk-bob"
MIB = 1 << 20
# the tiny Qwen2 of tests/factories.py
SHAPE = ModelShape("Qwen2ForCausalLM", 2, {
    "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
    "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}, 64)


@pytest.fixture(scope="module")
def site(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
         ) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("uploads-site")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"tenants": {"alice": [hash_key(ALICE)],
                                            "bob": [hash_key(BOB)]}}))
    (tmp / "imports").mkdir()
    settings = ServeSettings(port=_free_port(), cloud_model=str(tiny_model_dir),
                             edge_models=[str(tiny_model_dir)], max_context=512,
                             default_max_tokens=16, cache_dir=tmp / "cache",
                             api_keys_file=keys, state_dir=tmp / "state",
                             adapter_import_dirs=[tmp / "imports"], adapter_upload_mb=1,
                             guard=False)
    live = LiveServer(settings)
    live.start()
    yield live.url, tmp
    live.stop()


def left_nothing(state: Path) -> None:
    """Every stored directory belongs to a catalog record, and no upload is half-written."""
    stored = {f"adapters/{d.name}" for d in (state / "adapters").iterdir()}
    saved_file = state / "adapters.json"
    saved = json.loads(saved_file.read_text())["adapters"] if saved_file.exists() else []
    assert stored == {a["dir"] for a in saved}
    assert not list((state / "tmp").iterdir()) if (state / "tmp").exists() else True


def names(url: str, key: str) -> set[str]:
    r = httpx.get(f"{url}/v1/adapters", headers=auth(key), timeout=30)
    assert r.status_code == 200, r.text
    return {a["id"] for a in r.json()["data"]}


# ---- the size cap while streaming -----------------------------------------------------------
def chunked_upload(url: str, key: str, total: int) -> tuple[int, int, bytes]:
    """POST a multipart upload with Transfer-Encoding: chunked (no Content-Length) whose
    adapter_model part is `total` bytes, sending until the server answers. Returns the bytes
    of body sent, the status, and the response head."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "hostileboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"adapter_model\"; "
            f"filename=\"adapter_model.safetensors\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode()
    chunk = b"\0" * (256 << 10)
    sock = socket.create_connection((host, int(port)), timeout=120)
    sock.sendall((f"POST /v1/adapters HTTP/1.1\r\nHost: {host}\r\n"
                  f"Authorization: Bearer {key}\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n").encode())
    sent, answered = 0, False
    pieces = [head] + [chunk] * (total // len(chunk))
    try:
        for piece in pieces:
            # wait until we may send, or the server has answered (generous: never a race)
            readable, writable, _ = select.select([sock], [sock], [], 120)
            if readable:
                answered = True
                break
            assert writable, "the server neither read nor answered for 120 s"
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        if not answered:
            closing = f"\r\n--{boundary}--\r\n".encode()
            sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(closing), closing))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed: read what it said
    response = b""
    try:
        while b"\r\n\r\n" not in response:
            data = sock.recv(65536)
            if not data:
                break
            response += data
    except ConnectionResetError:
        pass
    sock.close()
    status = int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1") else 0
    return sent, status, response


def test_chunked_upload_is_cut_off_at_the_cap(site: tuple[str, Path]) -> None:
    url, tmp = site
    total = 64 * MIB  # 64 times the 1 MiB cap
    sent, status, response = chunked_upload(url, ALICE, total)
    assert status == 413, response[:300]
    # the server answered long before the body ended: it did not read (or spool) it all
    assert sent < total // 2, f"sent {sent} of {total} bytes before the 413"
    assert "big" not in names(url, ALICE)
    left_nothing(tmp / "state")


def test_a_json_registration_body_is_capped_while_read(site: tuple[str, Path]) -> None:
    url, tmp = site
    body = json.dumps({"name": "j", "path": "x", "description": "y" * (2 * MIB)}).encode()
    r = httpx.post(f"{url}/v1/adapters", headers={**auth(BOB), "content-type":
                                                   "application/json"}, content=body, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body", r.text
    left_nothing(tmp / "state")


# ---- crafted files --------------------------------------------------------------------------
def adapter_dir(tmp: Path, name: str, **kw: Any) -> Path:
    opts: dict[str, Any] = {"rank": 4, "alpha": 8, "targets": ("q_proj",), "seed": 1,
                            "std": 0.3, "dtype": torch.float32}
    opts.update(kw)
    return write_adapter(tmp / name, SHAPE, **opts)


def raw_header(path: Path, header: Any) -> None:
    raw = json.dumps(header).encode()
    (path / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", len(raw)) + raw + b"\0" * (2 * N))


@pytest.mark.parametrize(("header", "message"), HEADERS,
                         ids=[f"h{i}" for i in range(len(HEADERS))])
def test_crafted_headers_get_a_clear_400(site: tuple[str, Path], tmp_path: Path,
                                         header: Any, message: str) -> None:
    url, tmp = site
    path = adapter_dir(tmp_path, "crafted")
    raw_header(path, header)
    r = upload(url, ALICE, "crafted", path)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == 400
    assert len(r.text) < 1000  # a 5,000-character name is not echoed whole
    assert re.search(message, r.json()["error"]["message"]), r.text
    assert "crafted" not in names(url, ALICE)
    left_nothing(tmp / "state")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_adapter_is_refused_naming_the_tensor(site: tuple[str, Path],
                                                         tmp_path: Path, bad: float) -> None:
    url, tmp = site
    path = adapter_dir(tmp_path, "nan")
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors[B][3, 1] = bad
    save_file(tensors, str(weights))
    r = upload(url, ALICE, "nan", path)
    assert r.status_code == 400, r.text
    assert f"tensor {B} holds non-finite values" in r.json()["error"]["message"]
    assert "nan" not in names(url, ALICE)
    left_nothing(tmp / "state")


def test_base_model_path_in_a_config_is_never_read_or_echoed(site: tuple[str, Path],
                                                             tmp_path: Path) -> None:
    url, _ = site
    secret = tmp_path / "secret-model"
    secret.mkdir()
    (secret / "config.json").write_text(json.dumps(
        {"architectures": ["SECRET-ARCH-7f3a"], "hidden_size": 4242, "num_hidden_layers": 77}))
    path = adapter_dir(tmp_path, "labelled", base_model=str(secret))
    r = upload(url, ALICE, "labelled", path)
    assert r.status_code == 201, r.text
    listing = httpx.get(f"{url}/v1/adapters", headers=auth(ALICE), timeout=30).text
    for text in (r.text, listing):
        assert "SECRET-ARCH" not in text and "4242" not in text
    assert httpx.delete(f"{url}/v1/adapters/labelled", headers=auth(ALICE),
                        timeout=30).status_code == 200


# ---- server-local import paths ----------------------------------------------------------------
def _import_case(case: str, imports: Path, outside: Path) -> str:
    good = adapter_dir(outside, f"src-{case}")
    if case == "nul":
        return str(imports / "a\x00b")
    if case == "long":
        return str(imports / ("x" * 5000))
    if case == "dotdot":
        return str(imports / ".." / ".." / good.relative_to(good.anchor))
    if case == "dir-symlink":
        link = imports / "dir-link"
        link.symlink_to(good, target_is_directory=True)
        return str(link)
    if case == "file-symlink":  # a directory inside whose weights point outside
        d = imports / "file-link"
        d.mkdir()
        (d / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
        (d / "adapter_model.safetensors").symlink_to(good / "adapter_model.safetensors")
        return str(d)
    if case == "fifo":
        d = imports / "fifo"
        d.mkdir()
        (d / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
        os.mkfifo(d / "adapter_model.safetensors")
        return str(d)
    raise AssertionError(case)


@pytest.mark.parametrize(("case", "needle"), [
    ("nul", "NUL"),
    ("long", "at most 4096 characters"),
    ("dotdot", "not under an allowed import directory"),
    ("dir-symlink", "leads outside the import directories"),
    ("file-symlink", "symlink to a file outside the import directories"),
    ("fifo", "not a regular file"),
])
def test_hostile_import_paths_are_refused(site: tuple[str, Path], tmp_path: Path, case: str,
                                          needle: str) -> None:
    url, tmp = site
    path = _import_case(case, tmp / "imports", tmp_path)
    r = httpx.post(f"{url}/v1/adapters", headers=auth(BOB), timeout=60,
                   json={"name": f"imp-{case}", "path": path})
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"] and r.json()["error"]["param"] == "path"
    assert len(r.text) < 1000
    assert f"imp-{case}" not in names(url, BOB)
    left_nothing(tmp / "state")


# ---- one tenant's faults, another tenant's requests ----------------------------------------
def test_one_tenants_faults_fail_its_own_requests_only(site: tuple[str, Path],
                                                       tmp_path: Path) -> None:
    url, _ = site
    assert upload(url, ALICE, "steady", adapter_dir(tmp_path, "steady", seed=5)).status_code \
        == 201
    assert upload(url, BOB, "mine", adapter_dir(tmp_path, "mine", seed=6)).status_code == 201
    # finite weights (so accepted) that overflow float32 in the forward pass
    assert upload(url, BOB, "overflow", adapter_dir(tmp_path, "overflow", std=1e19,
                                                    targets=("q_proj", "v_proj"))
                  ).status_code == 201
    questions = [f"Question {i}: how can I sleep better?" for i in range(6)]
    refs = [chat(url, ALICE, "steady", q, max_tokens=24).json()["choices"][0]["message"]
            for q in questions]
    results: dict[str, httpx.Response] = {}
    start = threading.Barrier(len(questions) + 4)

    def run(key: str, tag: str, model: str, q: str, **extra: Any) -> None:
        start.wait()
        results[tag] = chat(url, key, model, q, **extra)

    jobs = [("alice", ALICE, f"a{i}", "steady", q, {"max_tokens": 24})
            for i, q in enumerate(questions)]
    jobs += [("bob", BOB, "t", "mine", questions[0], {"temperature": 1e-38, "seed": 1}),
             ("bob", BOB, "p", "mine", questions[1], {"temperature": 1.0, "top_p": 1e-46,
                                                     "seed": 2}),
             ("bob", BOB, "o1", "overflow", questions[2], {}),
             ("bob", BOB, "o2", "overflow", questions[3], {"temperature": 0.7, "seed": 3})]
    threads = [threading.Thread(target=run, args=(key, tag, model, q), kwargs=extra)
               for _, key, tag, model, q, extra in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(questions)):  # the other tenant: all answered, exactly as alone
        r = results[f"a{i}"]
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"] == refs[i]
    for tag in ("t", "p"):  # degenerate but valid values: answered (greedy in effect)
        assert results[tag].status_code == 200, results[tag].text
    r = chat(url, BOB, "mine", questions[0], temperature=1.0, seed=2**64)
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    for tag in ("o1", "o2"):  # its own overflowing adapter: a clear error, for it alone
        r = results[tag]
        assert r.status_code == 500, r.text
        msg = r.json()["error"]["message"]
        assert "with adapter 'bob/overflow'" in msg and "no other was affected" in msg, msg
    # a stream reports the same error in-band, and the server goes on serving everyone
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=auth(BOB), timeout=120,
                      json={"model": "overflow", "stream": True, "max_tokens": 8,
                            "messages": [{"role": "user", "content": "hi"}]}) as s:
        body = s.read().decode()
    assert "no other was affected" in body and body.rstrip().endswith("[DONE]")
    assert chat(url, ALICE, "steady", questions[0], max_tokens=24).json()["choices"][0][
        "message"] == refs[0]
