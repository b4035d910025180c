"""Decides what runs each step: which sequences, prefill or decode, who is preempted. No tensors,
no I/O; the model runner executes what it returns (DESIGN.md §6 rule 2)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pice.shared.engine.block_manager import BlockManager
from pice.shared.engine.sequence import SeqStatus, Sequence


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
                 max_num_batched_tokens: int) -> None:
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        assert self.blocks.blocks_for(len(seq) + seq.params.max_tokens) <= self.blocks.num_blocks,\
            "admission must refuse a request the whole pool cannot hold"
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput | None:
        """Prefill waiting sequences when any fit (FCFS, within the token budget); otherwise one
        decode step for every running sequence, preempting the newest when blocks run out."""
        batch: list[Sequence] = []
        tokens = 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if batch and tokens + len(seq) > self.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(seq):
                break
            self.blocks.allocate(seq)
            tokens += len(seq) - seq.num_cached_tokens
            seq.status = SeqStatus.RUNNING
            self.waiting.popleft()
            self.running.append(seq)
            batch.append(seq)
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

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop its blocks; it re-enters the queue first, keeping the
        tokens generated so far, and is prefilled again when blocks free up."""
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
        self.blocks.deallocate(seq)
        queue.remove(seq)
