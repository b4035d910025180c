"""A request inside the engine: its tokens, its blocks, how far its KV cache is computed."""

from __future__ import annotations

import itertools
from enum import Enum, auto

import torch

from pice.shared.errors import PiceError
from pice.shared.sampling import SamplingParams

_ids = itertools.count()


class SequenceFaultError(PiceError):
    """One sequence's computation failed (its logits went non-finite, its sampling or its
    forward pass raised); it alone was ended, every other sequence of the step went on."""

    status_code = 500


class SeqStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams,
                 adapter: str | None = None, lora_uid: int = 0, lora_rank: int = 0,
                 lora_groups: frozenset[str] = frozenset()) -> None:
        assert prompt_ids, "empty prompt"
        self.seq_id = next(_ids)
        self.status = SeqStatus.WAITING
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.block_table: list[int] = []
        self.num_cached_tokens = 0  # leading tokens whose K/V are in the cache
        self.logprobs: list[float] = []  # one per completion token
        # with params.top_logprobs = N: per completion token, the N likeliest (token, logprob)
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        # LoRA: the adapter's name, registration id (keys the prefix cache) and rank; the device
        # slot it holds while running; whether it was resident when first tried (cache hit);
        # how many later sequences were admitted ahead of it while it waited for a slot.
        self.adapter = adapter
        self.lora_uid = lora_uid
        self.lora_rank = lora_rank
        self.lora_groups = lora_groups  # fused projection groups it targets ("qkv", "o", ...)
        self.lora_slot: int | None = None
        self.lora_hit: bool | None = None
        self.bypassed = 0
        self.error: BaseException | None = None  # why it failed (then finish_reason "error")
        self.fault: str | None = None  # set by the sampler: why its row could not be sampled
        # the tokens that would end it (EOS, stop_token_ids): masked while it is shorter than
        # params.min_tokens (set by the engine, which knows the EOS ids)
        self.ending_ids: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def append(self, token_id: int, logprob: float) -> None:
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
