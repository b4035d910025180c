"""Decides what runs each step: which sequences, prefill or decode, who is preempted. No tensors,
no I/O; the model runner executes what it returns (DESIGN.md §6 rule 2)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pice.shared.engine.block_manager import BlockManager
from pice.shared.engine.sequence import SeqStatus, Sequence
from pice.shared.lora.pool import AdapterPool


@dataclass
class SchedulerOutput:
    seqs: list[Sequence]
    is_prefill: bool
    preempted: list[Sequence] = field(default_factory=list)  # moved back to waiting this step

    @property
    def num_tokens(self) -> int:
        if self.is_prefill:
            return sum(len(s) - s.num_cached_tokens for s in self.seqs)
        return len(self.seqs)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, pool: AdapterPool | None = None) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.pool = pool
        # A sequence waiting for an adapter slot lets at most this many later ones go first.
        self.max_bypass = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.failed: list[Sequence] = []  # finished outside a step (adapter load error)

    def add(self, seq: Sequence) -> None:
        assert self.blocks.blocks_for(len(seq) + seq.params.max_tokens) <= self.blocks.num_blocks,\
            "admission must refuse a request the whole pool cannot hold"
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput | None:
        """Prefill waiting sequences when any fit (FCFS, within the token budget); otherwise one
        decode step for every running sequence, preempting the newest when blocks run out.

        A sequence whose adapter cannot get a device slot yet (loading, or every slot pinned)
        is skipped; later ones may go ahead of it at most `max_bypass` times, then admission
        stops behind it until a slot frees up: FIFO-ish, never starving it."""
        batch: list[Sequence] = []
        tokens = 0
        skipped: Sequence | None = None  # the first sequence left waiting for a slot
        for seq in list(self.waiting):
            if len(self.running) >= self.max_num_seqs:
                break
            if batch and tokens + len(seq) > self.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(seq):
                break
            if skipped is not None and skipped.bypassed >= self.max_bypass:
                break
            if not self._acquire_adapter(seq):
                if not seq.is_finished:
                    skipped = skipped or seq
                continue
            if skipped is not None:
                skipped.bypassed += 1
            self.blocks.allocate(seq)
            tokens += len(seq) - seq.num_cached_tokens
            seq.status = SeqStatus.RUNNING
            self.waiting.remove(seq)
            self.running.append(seq)
            batch.append(seq)
        self._prefetch()
        if batch:
            return SchedulerOutput(batch, is_prefill=True)

        preempted: list[Sequence] = []
        while self.running and len(batch) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.blocks.can_append(seq):
                victim = self.running.pop() if self.running else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq)
                batch.append(seq)
        self.running.extendleft(reversed(batch))
        return SchedulerOutput(batch, is_prefill=False, preempted=preempted) if batch else None

    def _acquire_adapter(self, seq: Sequence) -> bool:
        """Pin the device slot of the sequence's adapter (True for base-model sequences)."""
        if seq.adapter is None or seq.lora_slot is not None:
            return True
        assert self.pool is not None, "a sequence names an adapter but the engine has no pool"
        if seq.lora_hit is None:
            seq.lora_hit = self.pool.is_resident(seq.adapter)
            self.pool.record(seq.lora_hit)
        try:
            seq.lora_slot = self.pool.acquire(seq.adapter)
        except Exception as exc:  # its file could not be read: fail it, keep serving
            seq.error = exc
            self.finish(seq, "error")
            self.failed.append(seq)
            return False
        return seq.lora_slot is not None

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.lora_slot is not None and seq.adapter is not None and self.pool is not None:
            self.pool.release(seq.adapter)
            seq.lora_slot = None

    def _prefetch(self) -> None:
        """Read the adapters the next waiting sequences need into host RAM, in the background."""
        if self.pool is not None:
            names = [s.adapter for s in list(self.waiting)[:2 * self.max_num_seqs]
                     if s.adapter is not None and s.lora_slot is None]
            if names:
                self.pool.prefetch(names)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop its blocks; it re-enters the queue first, keeping the
        tokens generated so far, and is prefilled again when blocks free up."""
        self._release_adapter(seq)
        self.blocks.deallocate(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence wherever it is (running, or waiting after a preemption)."""
        if seq.is_finished:
            return
        queue = self.running if seq.status == SeqStatus.RUNNING else self.waiting
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self._release_adapter(seq)
        self.blocks.deallocate(seq)
        queue.remove(seq)
