"""The first stage's recurrent pipeline (MDI-LLM style): it admits sequences within the group's KV
budget, keeps them in flight as micro-batches (at least as many as stages, so no stage idles),
applies each sampled token, detects stops, ends sequences on every stage, and after a re-plan
replays every unfinished sequence from its token history (prompt + tokens so far) so the new
stages rebuild their K/V. Pure bookkeeping: the node runs the model and the sockets."""

from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from collections.abc import Callable

from pice.edge.group.wire import Fwd
from pice.shared.errors import BadRequestError, ContextLengthError
from pice.shared.sampling import SamplingParams
from pice.shared.tokenizer import trim_at_stop


class GroupSeq:
    """One request in the group, as the first stage tracks it."""

    def __init__(self, seq_id: int, prompt: list[int], params: SamplingParams,
                 on_done: Callable[[GroupSeq], None] | None) -> None:
        self.seq_id = seq_id
        self.tokens = list(prompt)
        self.num_prompt = len(prompt)
        self.params = params
        self.logprobs: list[float] = []
        self.cached = 0  # leading tokens whose K/V every stage holds (0: send the history)
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.replays = 0  # times its history was replayed after a re-plan
        self.done = threading.Event()
        self.on_done = on_done

    @property
    def completion_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    def finish(self, reason: str | None, error: str | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)


class Driver:
    def __init__(self, num_blocks: int, block_size: int, max_model_len: int,
                 eos_ids: set[int], decode: Callable[[list[int]], str] | None = None) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.max_model_len = max_model_len
        self.eos_ids, self.decode = eos_ids, decode
        self.micro_batches = 1
        self.waiting: deque[GroupSeq] = deque()  # admitted when the KV budget allows
        self.running: dict[int, GroupSeq] = {}
        self.ready: deque[GroupSeq] = deque()  # next input known, not in flight
        self.reserved = 0  # blocks reserved by running sequences (prompt + max_tokens)
        self._ids = itertools.count(1)
        self.stats = {"steps": 0, "tokens": 0, "replayed_tokens": 0, "replays": 0}

    def blocks_for(self, seq: GroupSeq) -> int:
        return -(-(seq.num_prompt + seq.params.max_tokens) // self.block_size)

    def new_seq(self, prompt: list[int], params: SamplingParams,
                on_done: Callable[[GroupSeq], None] | None = None) -> GroupSeq:
        """A checked sequence (admission errors raise here, in the caller's thread)."""
        if not prompt:
            raise BadRequestError("prompt is empty", field="prompt")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ContextLengthError(f"prompt ({len(prompt)} tokens) + max_tokens "
                                     f"({params.max_tokens}) = {total} exceeds the context "
                                     f"limit of {self.max_model_len}", field="max_tokens")
        seq = GroupSeq(next(self._ids), prompt, params, on_done)
        if self.blocks_for(seq) > self.num_blocks:
            raise BadRequestError(f"request needs {self.blocks_for(seq)} KV blocks but the group "
                                  f"holds {self.num_blocks}", field="max_tokens")
        return seq

    def add(self, seq: GroupSeq) -> None:
        self.waiting.append(seq)
        self._admit()

    def _admit(self) -> None:
        while self.waiting and self.reserved + self.blocks_for(self.waiting[0]) <= self.num_blocks:
            seq = self.waiting.popleft()
            self.reserved += self.blocks_for(seq)
            self.running[seq.seq_id] = seq
            self.ready.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.ready)

    def next_batch(self) -> tuple[list[Fwd], list[int]] | None:
        """The next micro-batch: its records and its input token ids, or None. New sequences
        (prompts or replays) go as one batch of their own, decodes in batches of
        ceil(running / micro_batches), so that micro_batches of them circulate at once."""
        if not self.ready:
            return None
        fresh = [s for s in self.ready if s.cached == 0]
        if fresh:
            chosen = fresh
        else:
            size = max(1, math.ceil(len(self.running) / self.micro_batches))
            chosen = [self.ready[i] for i in range(min(size, len(self.ready)))]
        picked = {s.seq_id for s in chosen}
        self.ready = deque(s for s in self.ready if s.seq_id not in picked)
        fwd, ids = [], []
        for s in chosen:
            p = s.params
            # min_tokens: this step's token may not end the sequence (the last stage masks EOS)
            hold = not p.ignore_eos and len(s.tokens) - s.num_prompt < p.min_tokens
            if s.cached == 0:
                fwd.append(Fwd(s.seq_id, 0, len(s.tokens), True, p.top_k, p.temperature, p.top_p,
                               p.seed, hold))
                ids.extend(s.tokens)
                if s.replays:
                    self.stats["replayed_tokens"] += len(s.tokens)
            else:
                fwd.append(Fwd(s.seq_id, s.cached, 1, hold_end=hold))
                ids.append(s.tokens[-1])
        self.stats["steps"] += 1
        return fwd, ids

    def on_results(self, results: tuple[tuple[int, int, float], ...] | list[
            tuple[int, int, float]]) -> list[int]:
        """Apply sampled tokens; the ids of sequences that finished (to end on every stage)."""
        ended = []
        for seq_id, token, logprob in results:
            seq = self.running.get(seq_id)
            if seq is None:
                continue  # ended or re-planned meanwhile
            seq.cached = len(seq.tokens)
            seq.tokens.append(token)
            seq.logprobs.append(logprob)
            self.stats["tokens"] += 1
            reason = self._finish_reason(seq, token)
            if reason is None:
                self.ready.append(seq)
                continue
            self._retire(seq)
            seq.finish(reason)
            ended.append(seq_id)
        self._admit()
        return ended

    def _retire(self, seq: GroupSeq) -> None:
        del self.running[seq.seq_id]
        self.reserved -= self.blocks_for(seq)

    def _finish_reason(self, seq: GroupSeq, token: int) -> str | None:
        p = seq.params
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if p.stop and self.decode is not None:
            tail = 2 * max(len(s) for s in p.stop) + 8  # as the engine: decode the tail only
            if trim_at_stop(self.decode(seq.completion_ids[-tail:]), p.stop)[1]:
                return "stop"
        if len(seq.tokens) - seq.num_prompt >= p.max_tokens or \
                len(seq.tokens) >= self.max_model_len:
            return "length"
        return None

    def replay_all(self) -> int:
        """After a re-plan: every running sequence restarts from its token history (K/V gone
        everywhere). Returns how many."""
        self.ready = deque(sorted(self.running.values(), key=lambda s: s.seq_id))
        for s in self.ready:
            s.cached = 0
            s.replays += 1
        self.stats["replays"] += len(self.ready)
        return len(self.ready)

    def fail_all(self, reason: str) -> None:
        """The group cannot run any more: every sequence ends with an error."""
        for seq in [*self.running.values(), *self.waiting]:
            seq.finish(None, reason)
        self.running.clear()
        self.waiting.clear()
        self.ready.clear()
        self.reserved = 0

    def abort(self, seq_id: int) -> bool:
        """Drop a sequence nobody waits for; True when it was running (end it on the stages)."""
        seq = self.running.get(seq_id)
        if seq is None:
            self.waiting = deque(s for s in self.waiting if s.seq_id != seq_id)
            return False
        self._retire(seq)
        self.ready = deque(s for s in self.ready if s.seq_id != seq_id)
        seq.finish("abort")
        self._admit()
        return True
