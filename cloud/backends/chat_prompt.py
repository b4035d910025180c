"""Prompts for chat-only backends. The pipeline renders a chat into one prompt string and hands it
back to the same backend; a backend that talks to a chat API (OpenAI-compatible servers) renders
the messages as a tagged JSON string instead of a template, so `generate` gets them back intact."""

from __future__ import annotations

import json
import math
from typing import Any

from pice.shared.tokenizer import ChatTokenizer, Message, check_fits

TAG = "\x1epice-chat\x1e"  # record separators: never in a chat template's output
CHARS_PER_TOKEN = 4  # estimate for counting without the upstream's tokenizer (BPE on English)
TOKENS_PER_MESSAGE = 4  # role markers and separators a template adds per message


def encode(messages: list[Message], assistant_prefix: str = "") -> str:
    return TAG + json.dumps({"messages": messages, "prefix": assistant_prefix})


def decode(prompt: str) -> tuple[list[dict[str, Any]], str]:
    """The messages and assistant prefix of an encoded prompt; any other string is sent as the
    one user message."""
    if not prompt.startswith(TAG):
        return [{"role": "user", "content": prompt}], ""
    body = json.loads(prompt[len(TAG):])
    return list(body["messages"]), str(body["prefix"])


def extend(prompt: str, text: str) -> str:
    """The prompt that continues after `text` was generated (a broken stream resumes here)."""
    if not prompt.startswith(TAG):
        return prompt + text
    messages, prefix = decode(prompt)
    return encode(messages, prefix + text)


def to_request_messages(prompt: str) -> list[dict[str, Any]]:
    """Chat messages for the upstream; an assistant prefix becomes the last (assistant) message,
    which servers that continue it (vLLM: `continue_final_message`) extend."""
    messages, prefix = decode(prompt)
    if prefix:
        messages.append({"role": "assistant", "content": prefix})
    return messages


def count(text: str, tokenizer: ChatTokenizer | None) -> int:
    """Tokens of a prompt or a completion: exact with the upstream model's tokenizer, else an
    estimate (the upstream's `usage` gives the exact counts of what it generated)."""
    if text.startswith(TAG):
        messages, prefix = decode(text)
        if tokenizer is not None:
            return tokenizer.count_tokens(tokenizer.render_chat(messages, prefix))
        body = sum(len(str(m.get("content", ""))) for m in messages) + len(prefix)
        return math.ceil(body / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * (len(messages) + 1)
    if tokenizer is not None:
        return tokenizer.count_tokens(text)
    return math.ceil(len(text) / CHARS_PER_TOKEN)


class ChatAPIPrompts:
    """The prompt side of a backend behind a chat API: tagged-JSON prompts, counted with the
    upstream model's tokenizer when one is given."""

    def __init__(self, max_context: int, tokenizer: ChatTokenizer | None = None) -> None:
        self._max_context = max_context
        self.tokenizer = tokenizer

    @property
    def max_context(self) -> int:
        return self._max_context

    def render_chat(self, messages: list[Message], assistant_prefix: str = "") -> str:
        return encode(messages, assistant_prefix)

    def count_tokens(self, text: str) -> int:
        return count(text, self.tokenizer)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        check_fits(prompt_tokens, max_tokens, self.max_context)
