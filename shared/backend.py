"""The interface every text-generation backend implements (local transformers today, our own
engine and vLLM next). Runners call it; they never decide what to run."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from pice.shared.lora.adapter import AdapterInfo
from pice.shared.sampling import Completion, SamplingParams
from pice.shared.tokenizer import ChatTokenizer, Message


class TextGenerator(Protocol):
    name: str  # model spec it was loaded from

    @property
    def max_context(self) -> int:
        """Tokens a request may use (prompt + completion)."""
        ...

    def render_chat(self, messages: list[Message], assistant_prefix: str = "") -> str:
        """The model's chat template applied, ready for the assistant's turn (plus a prefix)."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise ContextLengthError (naming the field) when the request cannot fit."""
        ...

    def generate(self, prompts: list[str], params: SamplingParams,
                 adapters: Sequence[str | None] | None = None) -> list[Completion]:
        """All prompts as ONE batch; results in prompt order. adapters[i] names the LoRA adapter
        of prompt i (None: the base model); an unknown name raises NotFoundError first."""
        ...

    def generate_iter(self, prompts: list[str], params: SamplingParams,
                      adapters: Sequence[str | None] | None = None,
                      ) -> Iterator[tuple[int, Completion]]:
        """The same batch, yielding (prompt index, completion) as each one finishes."""
        ...

    def stream(self, prompt: str, params: SamplingParams,
               adapter: str | None = None) -> Iterator[str]:
        """Text deltas as they are produced; the last item is followed by StopIteration."""
        ...

    # ---- LoRA adapters (backends that cannot serve them refuse with BadRequestError) -------
    def add_adapter(self, name: str, path: Path) -> AdapterInfo:
        """Validate a PEFT adapter directory and register it (InvalidAdapterError,
        ConflictError for a taken name)."""
        ...

    def remove_adapter(self, name: str) -> None:
        """Unload it from every tier (NotFoundError; ConflictError while requests use it)."""
        ...

    def adapters(self) -> list[AdapterInfo]: ...

    def resident_adapters(self) -> set[str]:
        """Adapters in device slots now (cheap to use)."""
        ...


class ChatBackedGenerator:
    """Prompt-side operations, delegated to the backend's `ChatTokenizer`."""

    name: str
    chat: ChatTokenizer

    @property
    def max_context(self) -> int:
        return self.chat.max_context

    def render_chat(self, messages: list[Message], assistant_prefix: str = "") -> str:
        return self.chat.render_chat(messages, assistant_prefix)

    def count_tokens(self, text: str) -> int:
        return self.chat.count_tokens(text)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        self.chat.check_fits(prompt_tokens, max_tokens)
