"""`PICE_CLOUD_BACKEND=openai`: the cloud model is any OpenAI-compatible server (vLLM, SGLang,
llama.cpp server, a hosted API, another pice) reached over httpx. Streaming, token counts from
`usage`, timeouts, retries with backoff on connect errors and 5xx, and upstream failures as
502/504 errors that say what happened."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pice.cloud.backends import chat_prompt
from pice.cloud.backends.errors import UpstreamError, UpstreamTimeoutError
from pice.shared.errors import BadRequestError, NotFoundError
from pice.shared.lora.adapter import AdapterInfo
from pice.shared.sampling import Completion, SamplingParams
from pice.shared.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)


class OpenAISettings(BaseSettings):
    """PICE_OPENAI_* variables."""

    model_config = SettingsConfigDict(env_prefix="PICE_OPENAI_", extra="forbid")

    base_url: str = "http://127.0.0.1:8001/v1"  # up to and including /v1
    model: str | None = None  # name sent as `model` (None → PICE_CLOUD_MODEL)
    api_key: SecretStr | None = None  # or api_key_file, or $OPENAI_API_KEY
    api_key_file: Path | None = None  # first line is the key (a mounted Secret)
    timeout_s: float = Field(120.0, gt=0, le=3600)  # read/write: the slowest token may take this
    connect_timeout_s: float = Field(5.0, gt=0, le=300)
    retries: int = Field(3, ge=0, le=1000)  # extra attempts on connect errors, 429 and 5xx
    backoff_s: float = Field(0.25, ge=0, le=60)  # first wait; doubles per attempt
    backoff_max_s: float = Field(8.0, ge=0, le=600)  # longest wait between attempts
    max_connections: int = Field(64, ge=1, le=4096)  # also: prompts of one batch sent at once
    extra_body: dict[str, Any] = Field(default_factory=dict)  # merged into every request body
    tokenizer: str | None = None  # model spec whose tokenizer counts tokens (None: estimate)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")

    def key(self) -> str | None:
        if self.api_key_file is not None:
            try:
                return self.api_key_file.read_text().strip().splitlines()[0]
            except (OSError, IndexError) as exc:
                raise ValueError(f"api_key_file {self.api_key_file}: no key read ({exc})") \
                    from exc
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return os.environ.get("OPENAI_API_KEY")


@dataclass
class UpstreamCompletion(Completion):
    """A completion whose token counts come from elsewhere (an upstream's `usage`, a remote
    replica), without token ids."""

    usage_completion_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return self.usage_completion_tokens


class OpenAIGenerator(chat_prompt.ChatAPIPrompts):
    """A `TextGenerator` over an OpenAI-compatible chat-completions API."""

    def __init__(self, name: str, cfg: OpenAISettings, max_context: int,
                 tokenizer: ChatTokenizer | None = None) -> None:
        super().__init__(max_context, tokenizer)
        self.name = name
        self.cfg = cfg
        self.model = cfg.model or name
        key = cfg.key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(
            base_url=cfg.base_url, headers=headers,
            timeout=httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s),
            limits=httpx.Limits(max_connections=cfg.max_connections,
                                max_keepalive_connections=cfg.max_connections))
        self.pool = ThreadPoolExecutor(cfg.max_connections, thread_name_prefix="openai")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # ---- generation ----------------------------------------------------------------------
    def _body(self, prompt: str, params: SamplingParams, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model, "messages": chat_prompt.to_request_messages(prompt),
            "max_tokens": params.max_tokens, "temperature": params.temperature,
            "top_p": params.top_p, "stream": stream}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if stream:
            body["stream_options"] = {"include_usage": True}
        body.update(self.cfg.extra_body)
        return body

    def _check_adapters(self, adapters: Sequence[str | None] | None) -> None:
        for a in adapters or ():
            if a is not None:
                raise NotFoundError(f"adapter {a!r}: the openai cloud backend serves none",
                                    field="adapter")

    def generate(self, prompts: list[str], params: SamplingParams,
                 adapters: Sequence[str | None] | None = None) -> list[Completion]:
        out: list[Completion | None] = [None] * len(prompts)
        for i, c in self.generate_iter(prompts, params, adapters):
            out[i] = c
        assert all(c is not None for c in out)
        return [c for c in out if c is not None]

    def generate_iter(self, prompts: list[str], params: SamplingParams,
                      adapters: Sequence[str | None] | None = None,
                      ) -> Iterator[tuple[int, Completion]]:
        """Every prompt as its own request, all in flight at once (the upstream batches)."""
        self._check_adapters(adapters)
        futures = {self.pool.submit(self.complete, p, params): i for i, p in enumerate(prompts)}
        try:
            for f in as_completed(futures):
                yield futures[f], f.result()
        finally:
            for f in futures:
                f.cancel()

    def complete(self, prompt: str, params: SamplingParams) -> UpstreamCompletion:
        with self._request(self._body(prompt, params, stream=False)) as r:
            data = self._json(r)
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
            usage = data.get("usage") or {}
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise UpstreamError(f"upstream {self.cfg.base_url} answered an unexpected body: "
                                f"{str(data)[:200]}") from exc
        return UpstreamCompletion(
            text=text, token_ids=[], logprobs=[],
            prompt_tokens=int(usage.get("prompt_tokens", self.count_tokens(prompt))),
            finish_reason=str(choice.get("finish_reason") or "stop"),
            usage_completion_tokens=int(usage.get("completion_tokens",
                                                  self.count_tokens(text))))

    def stream(self, prompt: str, params: SamplingParams,
               adapter: str | None = None) -> Iterator[str]:
        """Deltas as the upstream sends them. Retries happen only before the first byte; a stream
        cut off mid-answer raises UpstreamError (the client sees it in-band)."""
        self._check_adapters([adapter])
        sent = 0
        with self._request(self._body(prompt, params, stream=True)) as r:
            try:
                for data in _sse_data(r):
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise UpstreamError(f"upstream error mid-stream: {_message(chunk)}")
                    for choice in chunk.get("choices") or ():
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            sent += len(delta)
                            yield delta
            except httpx.TimeoutException as exc:
                raise UpstreamTimeoutError(
                    f"upstream {self.cfg.base_url} stalled for over {self.cfg.timeout_s}s after "
                    f"{sent} characters") from exc
            except (httpx.TransportError, json.JSONDecodeError) as exc:
                raise UpstreamError(
                    f"upstream {self.cfg.base_url} broke off the stream after {sent} "
                    f"characters ({type(exc).__name__}: {exc})") from exc
        raise UpstreamError(f"upstream {self.cfg.base_url} ended the stream after {sent} "
                            "characters without [DONE]")

    # ---- transport -----------------------------------------------------------------------
    @contextmanager
    def _request(self, body: dict[str, Any]) -> Iterator[httpx.Response]:
        """POST /chat/completions with retries on connect errors, 429 and 5xx (backoff doubling
        from backoff_s); the open response, status 200."""
        attempts = self.cfg.retries + 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                req = self.client.build_request("POST", "/chat/completions", json=body)
                r = self.client.send(req, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                if last:
                    raise UpstreamError(f"upstream {self.cfg.base_url} unreachable after "
                                        f"{attempts} attempt(s): {exc}") from exc
                self._wait(attempt, f"{type(exc).__name__}: {exc}")
                continue
            except httpx.TimeoutException as exc:
                raise UpstreamTimeoutError(f"upstream {self.cfg.base_url} did not answer within "
                                           f"{self.cfg.timeout_s}s") from exc
            if r.status_code == 200:
                try:
                    yield r
                except httpx.TimeoutException as exc:
                    raise UpstreamTimeoutError(f"upstream {self.cfg.base_url} stalled for over "
                                               f"{self.cfg.timeout_s}s mid-answer") from exc
                finally:
                    r.close()
                return
            r.read()
            r.close()
            if (r.status_code >= 500 or r.status_code == 429) and not last:
                self._wait(attempt, f"HTTP {r.status_code}")
                continue
            raise UpstreamError(f"upstream {self.cfg.base_url} answered HTTP {r.status_code}"
                                f"{' after ' + str(attempts) + ' attempts' if attempt else ''}:"
                                f" {_message(_safe_json(r))}")

    def _wait(self, attempt: int, why: str) -> None:
        delay = min(self.cfg.backoff_s * 2 ** attempt, self.cfg.backoff_max_s)
        log.warning("upstream %s: %s; retry %d in %.2fs", self.cfg.base_url, why, attempt + 1,
                    delay)
        time.sleep(delay)

    def _json(self, r: httpx.Response) -> dict[str, Any]:
        try:
            r.read()
            data = r.json()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"upstream {self.cfg.base_url} did not finish the answer "
                                       f"within {self.cfg.timeout_s}s") from exc
        except httpx.TransportError as exc:
            raise UpstreamError(f"upstream {self.cfg.base_url} broke off the answer: "
                                f"{exc}") from exc
        except ValueError as exc:
            raise UpstreamError(f"upstream {self.cfg.base_url} answered non-JSON: "
                                f"{r.text[:200]!r}") from exc
        if not isinstance(data, dict):
            raise UpstreamError(f"upstream {self.cfg.base_url} answered {str(data)[:200]}")
        return data

    # ---- adapters: none ------------------------------------------------------------------
    def add_adapter(self, name: str, path: Path) -> AdapterInfo:
        raise BadRequestError("the openai cloud backend serves no LoRA adapters (load them on "
                              "the upstream server)", field="adapter")

    def remove_adapter(self, name: str) -> None:
        raise NotFoundError(f"adapter {name!r}: the openai cloud backend serves none",
                            field="adapter")

    def adapters(self) -> list[AdapterInfo]:
        return []

    def resident_adapters(self) -> set[str]:
        return set()


def _sse_data(r: httpx.Response) -> Iterator[str]:
    """`data:` payloads of a server-sent event stream (one per event; multi-line joined)."""
    lines: list[str] = []
    for line in r.iter_lines():
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].lstrip(" "))
    if lines:
        yield "\n".join(lines)


def _safe_json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text[:300]


def _message(body: Any) -> str:
    """The message of an OpenAI-shaped error body, else the body itself."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return str(body)[:300]
