"""Scheduling with adapter slots: a sequence waits (never fails) for a slot, later sequences may
pass it only a bounded number of times, and it runs as soon as a slot frees up."""

from __future__ import annotations

from pathlib import Path

import torch

from pice.bench.lora_adapters import write_adapter
from pice.shared.engine.block_manager import BlockManager
from pice.shared.engine.scheduler import Scheduler
from pice.shared.engine.sequence import Sequence
from pice.shared.lora.pool import AdapterPool
from pice.shared.sampling import SamplingParams
from tests.shared.lora.test_adapter import SHAPE

PARAMS = SamplingParams(max_tokens=4)


def test_waiting_for_a_slot_is_fair(tmp_path: Path) -> None:
    pool = AdapterPool(SHAPE, num_slots=1, max_rank=4, host_bytes=2**30, dtype=torch.float32,
                       device=torch.device("cpu"))
    for name in ("a", "b"):
        pool.add(name, write_adapter(tmp_path / name, SHAPE, rank=2, alpha=4,
                                     targets=("q_proj",)))
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=512,
                      pool=pool)
    sched.max_bypass = 2

    def seq(adapter: str | None) -> Sequence:
        return Sequence([1, 2, 3], PARAMS, adapter, pool.use(adapter) if adapter else 0, 2)

    first = seq("a")
    sched.add(first)
    while sched.schedule() is None:  # a is read from disk in the background meanwhile
        pool.wait_for_load(0.1)
    assert first.lora_slot == 0
    blocked, later = seq("b"), [seq(None) for _ in range(4)]
    for s in [blocked, *later]:
        sched.add(s)
    for _ in range(50):  # b's file is read, but the only slot is pinned by `first`
        out = sched.schedule()
        pool.wait_for_load(0.05)
        if out is not None and out.is_prefill:
            break
    assert out is not None and out.seqs == later[:2]  # two passed it, then admission stopped
    assert blocked.bypassed == 2 and blocked.lora_slot is None
    assert list(sched.waiting) == [blocked, *later[2:]]
    sched.finish(first, "stop")  # the slot is unpinned: b evicts a and goes first
    out = sched.schedule()
    assert out is not None and out.seqs[0] is blocked and blocked.lora_slot == 0
    assert pool.resident() == {"b"} and pool.stats["evictions"] == 1
