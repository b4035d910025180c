"""The cloud model as the gateway sees it under Ray Serve: a `TextGenerator` whose prompt side
runs here (the model's tokenizer, or the chat-API codec) and whose generation runs on the
cloud-model deployment. A call whose replica dies is sent again (greedy or seeded streams resume
where they broke off), so killing a replica mid-load loses no request."""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from pice.cloud.backends import chat_prompt
from pice.cloud.backends.errors import UpstreamError
from pice.cloud.backends.openai_backend import UpstreamCompletion
from pice.shared.backend import ChatBackedGenerator
from pice.shared.config import ServeSettings
from pice.shared.errors import BadRequestError, NotFoundError
from pice.shared.lora.adapter import AdapterInfo
from pice.shared.models import resolve_model
from pice.shared.sampling import Completion, SamplingParams
from pice.shared.tokenizer import ChatTokenizer, Message

log = logging.getLogger(__name__)

RETRYABLE = (RayActorError, BackPressureError)  # ActorDiedError / ActorUnavailableError


@dataclass
class RequestRoute:
    """Per HTTP request (a context variable the gateway sets): the affinity key its cloud calls
    carry, and the cloud replicas that served them."""

    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    cloud_replicas: list[str] = field(default_factory=list)


ROUTE: contextvars.ContextVar[RequestRoute | None] = contextvars.ContextVar("pice_route",
                                                                          default=None)


def prompt_side(settings: ServeSettings) -> Any:
    """What renders and counts prompts for the cloud backend, without its weights."""
    if settings.cloud_backend == "openai":
        from pice.cloud.backends.openai_backend import OpenAISettings

        spec = OpenAISettings().tokenizer
        tok = None if spec is None else ChatTokenizer(
            resolve_model(spec, settings.cache_dir, progress=False, dense=False).path,
            settings.max_context)
        return chat_prompt.ChatAPIPrompts(settings.max_context, tok)
    # the tokenizer and chat template only: no dense fp32 copy of a GGUF model's weights
    path = resolve_model(settings.cloud_model, settings.cache_dir, progress=False,
                         dense=False).path
    return ChatTokenizer(str(Path(path)), settings.max_context)


class RemoteCloud(ChatBackedGenerator):
    def __init__(self, handle: Any, settings: ServeSettings, retries: int = 3) -> None:
        self.name = settings.cloud_model
        self.chat = prompt_side(settings)
        self.handle = handle
        self.retries = retries

    def render_chat(self, messages: list[Message], assistant_prefix: str = "") -> str:
        return str(self.chat.render_chat(messages, assistant_prefix))

    def _route(self) -> RequestRoute:
        return ROUTE.get() or RequestRoute()

    def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return call()
            except RETRYABLE as exc:
                if attempt == self.retries:
                    raise UpstreamError(f"cloud model replicas failed {what} "
                                        f"{attempt + 1} times: {exc}") from exc
                log.warning("cloud replica lost during %s (%s); sending it again", what,
                            type(exc).__name__)
                time.sleep(min(0.1 * 2 ** attempt, 2.0))
        raise AssertionError("unreachable")

    def generate(self, prompts: list[str], params: SamplingParams,
                 adapters: Sequence[str | None] | None = None) -> list[Completion]:
        route = self._route()
        body = asdict(params)
        names = list(adapters) if adapters is not None else None
        out = self._retrying("a batch", lambda: self.handle.generate.remote(
            prompts, body, names, affinity=route.key).result())
        route.cloud_replicas.append(out["replica"])
        return [UpstreamCompletion(text=c["text"], token_ids=[], logprobs=[],
                                   prompt_tokens=c["prompt_tokens"],
                                   finish_reason=c["finish_reason"],
                                   usage_completion_tokens=c["completion_tokens"])
                for c in out["completions"]]

    def generate_iter(self, prompts: list[str], params: SamplingParams,
                      adapters: Sequence[str | None] | None = None,
                      ) -> Iterator[tuple[int, Completion]]:
        yield from enumerate(self.generate(prompts, params, adapters))

    def stream(self, prompt: str, params: SamplingParams,
               adapter: str | None = None) -> Iterator[str]:
        # read the route now: the generator body runs in another thread, without this context
        return self._stream(self._route(), prompt, params, adapter)

    def _stream(self, route: RequestRoute, prompt: str, params: SamplingParams,
                adapter: str | None) -> Iterator[str]:
        """A replica lost mid-stream: the next one continues from the prompt plus the text
        already sent (with what is left of max_tokens), so the client's text stays whole."""
        sent = ""
        for attempt in range(self.retries + 1):
            left = params.max_tokens - (self.count_tokens(sent) if sent else 0)
            if left < 1:
                return
            body = asdict(replace(params, max_tokens=left))
            try:
                gen = self.handle.options(stream=True).stream.remote(
                    chat_prompt.extend(prompt, sent), body, adapter, affinity=route.key)
                for item in gen:
                    if "replica" in item:
                        route.cloud_replicas.append(item["replica"])
                        continue
                    sent += item["text"]
                    yield item["text"]
                return
            except RETRYABLE as exc:
                if attempt == self.retries:
                    raise UpstreamError(f"cloud model replicas lost {attempt + 1} times "
                                        f"mid-stream ({len(sent)} characters sent): "
                                        f"{exc}") from exc
                log.warning("cloud replica lost mid-stream (%s); continuing after %d "
                            "characters", type(exc).__name__, len(sent))
                time.sleep(min(0.1 * 2 ** attempt, 2.0))

    # ---- adapters live on the edges here; the cloud replicas serve the base model ----------
    def add_adapter(self, name: str, path: Path) -> AdapterInfo:
        raise BadRequestError("cloud-model adapters are not served under Ray Serve",
                              field="adapter")

    def remove_adapter(self, name: str) -> None:
        raise NotFoundError(f"adapter {name!r} is not loaded on the cloud model", field="adapter")

    def adapters(self) -> list[AdapterInfo]:
        return []

    def resident_adapters(self) -> set[str]:
        return set()
