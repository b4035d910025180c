"""Tokenizer-side operations every backend shares: chat templates, token counts, stop tokens,
context checks."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer

from pice.shared.errors import ContextLengthError

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


class ChatTokenizer:
    def __init__(self, path: str, max_context: int, generation_eos: Any = None) -> None:
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"  # decoder-only batching pads on the left
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.max_context = max_context
        self.eos_ids = self._collect_eos_ids(generation_eos)

    def _collect_eos_ids(self, generation_eos: Any) -> set[int]:
        ids: set[int] = set()
        for source in (generation_eos, self.tok.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        for name in ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>"):
            tid = self.tok.convert_tokens_to_ids(name)
            if isinstance(tid, int) and tid >= 0 and tid != self.tok.unk_token_id:
                ids.add(tid)
        return ids

    def render_chat(self, messages: list[Message], assistant_prefix: str = "") -> str:
        if self.tok.chat_template:
            text = self.tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
            assert isinstance(text, str)
        else:  # base models (gemma-3-270m): a plain transcript the model can continue
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
            text += "Assistant:" + (" " if assistant_prefix else "")
        return text + assistant_prefix

    def encode(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        assert isinstance(ids, list)
        return ids

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        check_fits(prompt_tokens, max_tokens, self.max_context)


def check_fits(prompt_tokens: int, max_tokens: int, max_context: int) -> None:
    """A request of `prompt_tokens` + `max_tokens` fits a context of `max_context`, or a 400
    naming the field to change."""
    if max_tokens >= max_context:
        raise ContextLengthError(
            f"max_tokens {max_tokens} exceeds the context limit of {max_context}",
            field="max_tokens")
    if prompt_tokens + max_tokens > max_context:
        raise ContextLengthError(
            f"prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
            f"{prompt_tokens + max_tokens} exceeds the context limit of {max_context}",
            field="messages")


def trim_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Text before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
