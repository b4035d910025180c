"""The engine: admission, and a step that is schedule → execute → update_from_output.

A fault in one sequence ends that sequence alone: a row the sampler could not sample (non-finite
logits) ends its sequence with a SequenceFaultError, and when the batched forward pass raises,
each sequence is run alone so only the ones that fail by themselves are ended."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from pice.shared.engine.block_manager import BlockManager
from pice.shared.engine.config import EngineConfig
from pice.shared.engine.lora import model_shape
from pice.shared.engine.model_runner import ModelRunner
from pice.shared.engine.sampler import FAULT_TOKEN
from pice.shared.engine.scheduler import Scheduler, SchedulerOutput
from pice.shared.engine.sequence import Sequence, SequenceFaultError
from pice.shared.errors import BadRequestError, ContextLengthError
from pice.shared.lora.pool import AdapterPool
from pice.shared.lora.slots import GROUP_OF
from pice.shared.sampling import SamplingParams
from pice.shared.tokenizer import trim_at_stop

log = logging.getLogger(__name__)


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
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0, "steps": 0,
                      "faults": 0}
        self.warm_up()

    def warm_up(self, prompt_len: int = 16, new_tokens: int = 8) -> None:
        """One short greedy request through prefill and decode before the first real one, so
        no first request pays for a one-time cost (kernel loading, thread-pool start, first
        touch of buffers); leaves the counters at zero and nothing in the prefix cache that a
        request could reuse by accident (ids 0..n-1 are no tokenizer's real prompt)."""
        n = min(prompt_len, self.max_model_len - new_tokens - 1, self.runner.model.vocab_size)
        if n < 1 or self.blocks.blocks_for(n + new_tokens) > self.blocks.num_blocks:
            return  # a pool or context too small to spare: the first request warms it
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        self.generate_ids([list(range(n))], params)
        self.stats = dict.fromkeys(self.stats, 0)

    # ---- admission: every refusal happens here, never inside a step ------------------------
    def make_sequence(self, prompt_ids: list[int], params: SamplingParams,
                      adapter: str | None = None) -> Sequence:
        """A checked sequence; naming an adapter counts it as a user of it (see `release`)."""
        if not prompt_ids:
            raise BadRequestError("prompt is empty", field="prompt")
        vocab = self.runner.model.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt_ids):
            raise BadRequestError(f"prompt token ids must be integers in [0, {vocab})",
                                  field="prompt")
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
            seq = Sequence(prompt_ids, params)
        else:
            uid = self.pool.use(adapter)  # NotFoundError for an unknown name
            info = self.pool.info(adapter)
            groups = frozenset(GROUP_OF[p][0] for p in info.target_modules)
            seq = Sequence(prompt_ids, params, adapter, uid, info.rank, groups)
        if params.min_tokens:
            ending = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
            seq.ending_ids = tuple(sorted(t for t in ending if 0 <= t < vocab))
        return seq

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
        token_ids, logprobs = self._execute(batch)
        return failed + self.update_from_output(batch, token_ids, logprobs)

    def _execute(self, batch: SchedulerOutput) -> tuple[list[int], list[float]]:
        """The runner's tokens for the batch; when the batched pass raises, each sequence runs
        alone and those that still raise get FAULT_TOKEN (their fault named in `fault`)."""
        try:
            return self.runner.execute(batch)
        except Exception as exc:
            if len(batch.seqs) == 1:
                batch.seqs[0].fault = f"the forward pass failed ({type(exc).__name__}: {exc})"
                log.warning("sequence %d failed alone: %s", batch.seqs[0].seq_id, exc)
                return [FAULT_TOKEN], [float("nan")]
        # Rerunning is safe: a sequence's K/V slots are rewritten with the same values, and
        # num_cached_tokens only moves once its forward pass succeeded.
        ids: list[int] = []
        lps: list[float] = []
        for seq in batch.seqs:
            one = SchedulerOutput([seq], batch.is_prefill)
            (token,), (lp,) = self._execute(one)
            ids.append(token)
            lps.append(lp)
        return ids, lps

    def _fail(self, seq: Sequence) -> None:
        """End a faulted sequence alone: its K/V may be non-finite, so the blocks only it holds
        are zeroed (attention reads padding slots with weight 0, and 0 * NaN is NaN) and no
        prefix-cache key points at them."""
        reason = seq.fault or "unknown fault"
        owned = [b for b in seq.block_table if self.blocks.blocks[b].ref_count == 1]
        if owned:
            idx = torch.tensor(owned, dtype=torch.long, device=self.runner.device)
            for k_cache, v_cache in self.runner.kv_caches:  # each [blocks, bs, kv_heads, hd]
                k_cache.index_fill_(0, idx, 0)
                v_cache.index_fill_(0, idx, 0)
        self.blocks.forget(seq)
        where = f" with adapter {seq.adapter!r}" if seq.adapter is not None else ""
        seq.error = SequenceFaultError(
            f"generation failed at completion token {seq.num_completion_tokens + 1}{where}: "
            f"{reason}; this request was ended, no other was affected")
        self.stats["faults"] += 1
        self.scheduler.finish(seq, "error")

    def update_from_output(self, batch: SchedulerOutput, token_ids: list[int],
                           logprobs: list[float]) -> list[Sequence]:
        for seq, token, logprob in zip(batch.seqs, token_ids, logprobs, strict=True):
            if token == FAULT_TOKEN:
                self._fail(seq)
                continue
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
