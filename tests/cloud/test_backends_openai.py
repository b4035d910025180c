"""The `openai` cloud backend against a real OpenAI-compatible server: a second `pice serve`
process on loopback (tiny random model, API keys on). Direct answers from the upstream are the
reference; the upstream is stalled (SIGSTOP), started late and killed mid-stream."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pice.cloud.backends import chat_prompt
from pice.cloud.backends.errors import UpstreamError, UpstreamTimeoutError
from pice.cloud.backends.openai_backend import OpenAIGenerator, OpenAISettings
from pice.cloud.tenants import hash_key
from pice.shared.config import ServeSettings
from pice.shared.sampling import SamplingParams
from pice.shared.tokenizer import ChatTokenizer
from tests.cloud.pice_procs import PiceProcess
from tests.conftest import LiveServer, _free_port

KEY = "sk-test-upstream-key"
QUESTION = [{"role": "user", "content": "How can I sleep better?"}]
CLOUD_ONLY = {"pice": {"mode": "cloud"}}  # ask the upstream pice for a plain cloud answer


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps({"tenants": {"ci": [hash_key(KEY)]}}))
    return path


@pytest.fixture(scope="module")
def upstream(tiny_model_dir: Path, keys_file: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[PiceProcess]:
    proc = PiceProcess(_free_port(), tiny_model_dir, tmp_path_factory.mktemp("upstream"),
                       env={"PICE_API_KEYS_FILE": str(keys_file)})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def generator(upstream_url: str, model_dir: Path, **overrides: Any) -> OpenAIGenerator:
    fields: dict[str, Any] = {"base_url": f"{upstream_url}/v1", "api_key": KEY,
                              "extra_body": CLOUD_ONLY, "backoff_s": 0.05}
    cfg = OpenAISettings(**{**fields, **overrides})
    return OpenAIGenerator(str(model_dir), cfg, 1024, ChatTokenizer(str(model_dir), 1024))


def direct(url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/chat/completions", json={**body, **CLOUD_ONLY}, timeout=120,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_generate_matches_upstream_and_counts_usage(upstream: PiceProcess,
                                                    tiny_model_dir: Path) -> None:
    gen = generator(upstream.url, tiny_model_dir)
    ref = direct(upstream.url, {"messages": QUESTION, "max_tokens": 12})
    prompts = [gen.render_chat(QUESTION), gen.render_chat([{"role": "user", "content": "Hi"}])]
    out = gen.generate(prompts, SamplingParams(max_tokens=12))
    assert out[0].text == ref["choices"][0]["message"]["content"]
    assert out[0].prompt_tokens == ref["usage"]["prompt_tokens"]
    assert out[0].completion_tokens == ref["usage"]["completion_tokens"] > 0
    # the prompt is counted with the upstream's own tokenizer and chat template
    assert gen.count_tokens(prompts[0]) == ref["usage"]["prompt_tokens"]
    # results come back in prompt order (both were in flight at once)
    assert out[1].prompt_tokens == gen.count_tokens(prompts[1]) != out[0].prompt_tokens
    gen.close()


def test_stream_matches_generate(upstream: PiceProcess, tiny_model_dir: Path) -> None:
    gen = generator(upstream.url, tiny_model_dir)
    prompt = gen.render_chat(QUESTION)
    [whole] = gen.generate([prompt], SamplingParams(max_tokens=20))
    deltas = list(gen.stream(prompt, SamplingParams(max_tokens=20)))
    assert len(deltas) > 1 and "".join(deltas) == whole.text
    gen.close()


def test_assistant_prefix_travels_as_last_message() -> None:
    prompt = chat_prompt.encode(QUESTION, "1. Fixed schedule:")
    assert chat_prompt.to_request_messages(prompt) == [
        *QUESTION, {"role": "assistant", "content": "1. Fixed schedule:"}]


def test_wrong_key_is_a_502_naming_the_upstream_status(upstream: PiceProcess,
                                                       tiny_model_dir: Path) -> None:
    gen = generator(upstream.url, tiny_model_dir, api_key="sk-wrong")
    with pytest.raises(UpstreamError) as err:
        gen.generate([gen.render_chat(QUESTION)], SamplingParams(max_tokens=4))
    assert err.value.status_code == 502 and "HTTP 401" in err.value.message


def test_key_from_file(upstream: PiceProcess, tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY + "\n")
    gen = generator(upstream.url, tiny_model_dir, api_key=None, api_key_file=tmp_path / "key")
    [out] = gen.generate([gen.render_chat(QUESTION)], SamplingParams(max_tokens=4))
    assert out.completion_tokens > 0


def test_stalled_upstream_is_a_504(upstream: PiceProcess, tiny_model_dir: Path) -> None:
    gen = generator(upstream.url, tiny_model_dir, timeout_s=1.0)
    upstream.signal(signal.SIGSTOP)  # accepts connections (kernel backlog), never answers
    try:
        with pytest.raises(UpstreamTimeoutError) as err:
            gen.generate([gen.render_chat(QUESTION)], SamplingParams(max_tokens=4))
    finally:
        upstream.signal(signal.SIGCONT)
    assert err.value.status_code == 504


def test_retries_until_a_late_upstream_answers(tiny_model_dir: Path, keys_file: Path,
                                               tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Connection refused, then 503 while it loads, then the answer: retried with backoff."""
    port = _free_port()
    gen = generator(f"http://127.0.0.1:{port}", tiny_model_dir, retries=400, backoff_s=0.05,
                    backoff_max_s=0.5)
    late = PiceProcess(port, tiny_model_dir, tmp_path, env={"PICE_API_KEYS_FILE": str(keys_file)})
    try:
        with caplog.at_level(logging.WARNING, "pice.cloud.backends.openai_backend"):
            [out] = gen.generate([gen.render_chat(QUESTION)], SamplingParams(max_tokens=4))
    finally:
        late.stop()
    assert out.completion_tokens > 0
    assert any("ConnectError" in r.message for r in caplog.records)


def test_nothing_listening_is_a_502_after_retries(tiny_model_dir: Path) -> None:
    gen = generator(f"http://127.0.0.1:{_free_port()}", tiny_model_dir, retries=2)
    with pytest.raises(UpstreamError) as err:
        list(gen.stream(gen.render_chat(QUESTION), SamplingParams(max_tokens=4)))
    assert "unreachable after 3 attempt(s)" in err.value.message


# ---- pice served on the openai backend -----------------------------------------------------
@pytest.fixture(scope="module")
def victim(tiny_model_dir: Path, keys_file: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[PiceProcess]:
    """An upstream the last test kills."""
    proc = PiceProcess(_free_port(), tiny_model_dir, tmp_path_factory.mktemp("victim"),
                       env={"PICE_API_KEYS_FILE": str(keys_file)})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def downstream(victim: PiceProcess, tiny_model_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"BASE_URL": f"{victim.url}/v1", "API_KEY": KEY, "RETRIES": "1",
                     "BACKOFF_S": "0.05", "EXTRA_BODY": json.dumps(CLOUD_ONLY),
                     "TOKENIZER": str(tiny_model_dir)}.items():
            mp.setenv(f"PICE_OPENAI_{k}", v)
        settings = ServeSettings(port=_free_port(), cloud_backend="openai",
                                 cloud_model=str(tiny_model_dir),
                                 edge_models=[str(tiny_model_dir)], max_context=1024,
                                 default_max_tokens=64, guard=False,
                                 cache_dir=tmp_path_factory.mktemp("down-cache"))
        live = LiveServer(settings)
        live.start()
        yield live
        live.stop()


def test_served_answer_equals_the_upstream_answer(downstream: LiveServer,
                                                  victim: PiceProcess) -> None:
    body = {"messages": QUESTION, "max_tokens": 16}
    ref = direct(victim.url, body)
    r = httpx.post(f"{downstream.url}/v1/chat/completions", timeout=120, json={**body,
                   "pice": {"mode": "cloud"}})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["choices"][0]["message"]["content"] == ref["choices"][0]["message"]["content"]
    assert got["usage"]["prompt_tokens"] == ref["usage"]["prompt_tokens"]


def stream_chunks(url: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                yield json.loads(line[5:])


def test_upstream_killed_mid_stream_is_a_502_in_band(downstream: LiveServer,
                                                     victim: PiceProcess) -> None:
    """Kill -9 the upstream after the first words: the client gets what was said, then an
    error naming the break (code 502), then [DONE]; later requests get a 502 at once."""
    body = {"messages": QUESTION, "max_tokens": 900, "stream": True, "pice": {"mode": "cloud"}}
    text, errors = "", []
    for chunk in stream_chunks(downstream.url, body):
        if "error" in chunk:
            errors.append(chunk["error"])
            continue
        delta = chunk["choices"][0]["delta"].get("content") or ""
        if delta and not text:
            victim.proc.kill()  # mid-answer: 900 tokens were asked for
        text += delta
    assert text, "no words before the kill"
    assert len(errors) == 1 and errors[0]["code"] == 502
    assert "broke off the stream" in errors[0]["message"]
    r = httpx.post(f"{downstream.url}/v1/chat/completions", timeout=120,
                   json={"messages": QUESTION, "max_tokens": 4, "pice": {"mode": "cloud"}})
    assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"]
