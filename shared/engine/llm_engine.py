"""The engine: admission, and a step that is schedule → execute → update_from_output."""

from __future__ import annotations

from collections.abc import Callable

from pice.shared.engine.block_manager import BlockManager
from pice.shared.engine.config import EngineConfig
from pice.shared.engine.lora import model_shape
from pice.shared.engine.model_runner import ModelRunner
from pice.shared.engine.scheduler import Scheduler, SchedulerOutput
from pice.shared.engine.sequence import Sequence
from pice.shared.errors import BadRequestError, ContextLengthError
from pice.shared.lora.pool import AdapterPool
from pice.shared.lora.slots import GROUP_OF
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
        self.pool = AdapterPool(model_shape(self.runner.model), num_slots=cfg.lora_slots,
                                max_rank=cfg.lora_max_rank,
                                host_bytes=int(cfg.lora_host_gb * 2**30),
                                dtype=self.runner.dtype, device=self.runner.device)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens,
                                   self.pool)
        # counters: tokens actually computed in prefill and decode steps, preemptions
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0, "steps": 0}

    # ---- admission: every refusal happens here, never inside a step ------------------------
    def make_sequence(self, prompt_ids: list[int], params: SamplingParams,
                      adapter: str | None = None) -> Sequence:
        """A checked sequence; naming an adapter counts it as a user of it (see `release`)."""
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
        if adapter is None:
            return Sequence(prompt_ids, params)
        uid = self.pool.use(adapter)  # NotFoundError for an unknown name
        info = self.pool.info(adapter)
        groups = frozenset(GROUP_OF[p][0] for p in info.target_modules)
        return Sequence(prompt_ids, params, adapter, uid, info.rank, groups)

    def release(self, seq: Sequence) -> None:
        """The caller is done with a sequence (finished or never run): drop its adapter use."""
        if seq.adapter is not None:
            self.pool.unuse(seq.adapter)

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
        if self.pool.buffers is not None:
            self.runner.lora.buffers = self.pool.buffers
        batch = self.scheduler.schedule()
        failed, self.scheduler.failed = self.scheduler.failed, []
        if batch is None:
            if not failed and self.scheduler.waiting and not self.scheduler.running:
                self.pool.wait_for_load(0.05)  # waiting on an adapter read: do not spin
            return failed
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
        return failed + self.update_from_output(batch, token_ids, logprobs)

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

    def generate_ids(self, prompts: list[list[int]], params: SamplingParams,
                     adapters: list[str | None] | None = None) -> list[Sequence]:
        """Synchronous batch run (benchmarks, tests); serving goes through EngineGenerator."""
        names = adapters if adapters is not None else [None] * len(prompts)
        seqs = [self.make_sequence(p, params, a) for p, a in zip(prompts, names, strict=True)]
        for seq in seqs:
            self.add(seq)
        try:
            while self.has_work:
                self.step()
        finally:
            for seq in seqs:
                self.release(seq)
        return seqs
