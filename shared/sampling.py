"""Sampling parameters and the plain result of one generation."""

from __future__ import annotations

from dataclasses import dataclass, field

from pice.shared.errors import BadRequestError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings
    stop_token_ids: tuple[int, ...] = ()  # extra tokens that end generation (besides EOS)
    ignore_eos: bool = False  # run to max_tokens (benchmarks)
    min_tokens: int = 0  # EOS and stop_token_ids cannot be chosen before this many (vLLM's)
    top_logprobs: int = 0  # also keep the N most likely tokens per step (OpenAI's top_logprobs)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise BadRequestError(f"max_tokens must be >= 1, got {self.max_tokens}",
                                  field="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise BadRequestError(
                f"temperature must be in [0, 2], got {self.temperature}", field="temperature"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise BadRequestError(f"top_p must be in (0, 1], got {self.top_p}", field="top_p")
        if not 0 <= self.top_logprobs <= 20:
            raise BadRequestError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}",
                                  field="top_logprobs")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise BadRequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                                  f"got {self.min_tokens}", field="min_tokens")
        if self.top_k < 0:
            raise BadRequestError(f"top_k must be >= 0, got {self.top_k}", field="top_k")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # a torch generator's
            raise BadRequestError(f"seed must be in [-2^63, 2^64), got {self.seed}", field="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Completion:
    """One finished sequence."""

    text: str
    token_ids: list[int]
    logprobs: list[float]  # log p(token) under the model, one per generated token
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0
