"""The engine: admission, and a step that is schedule → execute → update_from_output."""

from __future__ import annotations

from collections.abc import Callable

from pice.shared.engine.block_manager import BlockManager
from pice.shared.engine.config import EngineConfig
from pice.shared.engine.model_runner import ModelRunner
from pice.shared.engine.scheduler import Scheduler, SchedulerOutput
from pice.shared.engine.sequence import Sequence
from pice.shared.errors import BadRequestError, ContextLengthError
from pice.shared.sampling import SamplingParams
from pice.shared.tokenizer import trim_at_stop


class LLMEngine:
    def __init__(self, cfg: EngineConfig, eos_ids: set[int],
                 decode: Callable[[list[int]], str]) -> None:
        self.cfg = cfg
        self.eos_ids = eos_ids
        self.decode = decode
        self.runner = ModelRunner(cfg)
        self.max_model_len = min(cfg.max_model_len, self.runner.model.max_position_embeddings)
        self.blocks = BlockManager(self.runner.num_blocks, cfg.block_size, cfg.prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        # counters: tokens actually computed in prefill and decode steps, preemptions
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0, "steps": 0}

    # ---- admission: every refusal happens here, never inside a step ------------------------
    def make_sequence(self, prompt_ids: list[int], params: SamplingParams) -> Sequence:
        if not prompt_ids:
            raise BadRequestError("prompt is empty", field="prompt")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the context limit of {self.max_model_len}", field="max_tokens")
        if self.blocks.blocks_for(total) > self.blocks.num_blocks:
            raise BadRequestError(
                f"request needs {self.blocks.blocks_for(total)} KV blocks but the pool has "
                f"{self.blocks.num_blocks}; raise kv_cache_gb or lower max_tokens",
                field="max_tokens")
        return Sequence(prompt_ids, params)

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence nobody is waiting for any more (a client went away)."""
        self.scheduler.finish(seq, "abort")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """One forward pass; returns the sequences that gained a token (some now finished)."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        self.stats["prefill_tokens" if batch.is_prefill else "decode_tokens"] += batch.num_tokens
        self.stats["preemptions"] += len(batch.preempted)
        self.stats["steps"] += 1
        try:
            token_ids, logprobs = self.runner.execute(batch)
        except Exception:
            for seq in batch.seqs:  # their blocks may hold half-written K/V
                self.blocks.forget(seq)
                self.scheduler.finish(seq, "error")
            raise
        return self.update_from_output(batch, token_ids, logprobs)

    def update_from_output(self, batch: SchedulerOutput, token_ids: list[int],
                           logprobs: list[float]) -> list[Sequence]:
        for seq, token, logprob in zip(batch.seqs, token_ids, logprobs, strict=True):
            seq.append(token, logprob)
            reason = self._finish_reason(seq, token)
            if reason:
                self.scheduler.finish(seq, reason)
        return batch.seqs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if (token in self.eos_ids and not seq.params.ignore_eos) or \
                token in seq.params.stop_token_ids:
            return "stop"
        if seq.params.stop:
            # A stop string completed by this token lies within the last few tokens (each
            # decodes to >= 1 character), so only that tail is decoded: O(1) per step.
            tail = 2 * max(len(s) for s in seq.params.stop) + 8
            if trim_at_stop(self.decode(seq.completion_ids[-tail:]), seq.params.stop)[1]:
                return "stop"
        if seq.num_completion_tokens >= seq.params.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def generate_ids(self, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
        """Synchronous batch run (benchmarks, tests); serving goes through EngineGenerator."""
        seqs = [self.make_sequence(p, params) for p in prompts]
        for seq in seqs:
            self.add(seq)
        while self.has_work:
            self.step()
        return seqs
