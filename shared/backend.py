"""The interface every text-generation backend implements (local transformers today, our own
engine and vLLM next). Runners call it; they never decide what to run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from pice.shared.sampling import Completion, SamplingParams

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


class TextGenerator(Protocol):
    name: str  # model spec it was loaded from
    max_context: int  # tokens the model attends over (prompt + completion)

    def render_chat(self, messages: list[Message], assistant_prefix: str = "") -> str:
        """The model's chat template applied, ready for the assistant's turn (plus a prefix)."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        """All prompts as ONE batch; results in prompt order."""
        ...

    def stream(self, prompt: str, params: SamplingParams) -> Iterator[str]:
        """Text deltas as they are produced; the last item is followed by StopIteration."""
        ...
