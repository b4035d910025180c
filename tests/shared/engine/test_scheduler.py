"""The scheduler alone (no model): budgets, FCFS, preemption by recompute, nothing lost."""

import re

import pytest
import torch

from pice.shared.engine.block_manager import BlockManager
from pice.shared.engine.scheduler import Scheduler
from pice.shared.engine.sequence import Sequence
from pice.shared.sampling import SamplingParams


def run_to_completion(sched: Scheduler, max_steps: int = 1000) -> tuple[int, int]:
    """Play the runner: mark K/V computed, append a token, finish at max_tokens."""
    steps = preemptions = 0
    while sched.has_work:
        out = sched.schedule()
        assert out is not None, "work left but nothing schedulable (deadlock)"
        preemptions += len(out.preempted)
        for s in out.seqs:
            s.num_cached_tokens = len(s)
            s.append(7, -0.1)
            if s.num_completion_tokens >= s.params.max_tokens:
                sched.finish(s, "length")
        steps += 1
        assert steps < max_steps
    return steps, preemptions


def test_prefill_batches_within_token_budget() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=20)
    seqs = [Sequence(list(range(i * 10, i * 10 + 8)), SamplingParams(max_tokens=2))
            for i in range(4)]
    for s in seqs:
        sched.add(s)
    first = sched.schedule()
    assert first is not None and first.is_prefill
    assert first.seqs == seqs[:2]  # 8 + 8 fits 20; the third would not
    assert first.num_tokens == 16


def test_max_num_seqs_caps_the_batch() -> None:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(Sequence([i + 1, 2, 3], SamplingParams(max_tokens=1)))
    out = sched.schedule()
    assert out is not None and len(out.seqs) == 2


def test_block_shortage_preempts_and_every_request_finishes() -> None:
    # 12 blocks of 4: three sequences growing to 4 + 14 tokens cannot all stay resident.
    sched = Scheduler(BlockManager(12, 4), max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [Sequence([i + 1, 2, 3, 4], SamplingParams(max_tokens=14)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    _, preemptions = run_to_completion(sched)
    assert preemptions > 0
    assert all(s.is_finished and s.num_completion_tokens == 14 for s in seqs)
    assert sched.blocks.num_free == 12  # nothing leaked


def test_admission_refuses_what_the_pool_cannot_hold() -> None:
    sched = Scheduler(BlockManager(2, 4), max_num_seqs=4, max_num_batched_tokens=64)
    with pytest.raises(AssertionError, match="admission"):
        sched.add(Sequence([1, 2, 3], SamplingParams(max_tokens=20)))


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"block_size": 3}, "block_size must be a power of 2 in [1, 128], got 3"),
    ({"kv_cache_gb": 0}, "kv_cache_gb must be > 0, got 0"),
    ({"max_num_seqs": 0}, "max_num_seqs must be >= 1, got 0"),
    ({"max_num_batched_tokens": 16, "max_model_len": 32}, "must be >= max_model_len (32)"),
    ({"dtype": "int4"}, "got 'int4'"),
    ({"quantization": "fp8"}, "got 'fp8'"),
])
def test_engine_config_names_the_bad_value(kwargs: dict[str, object], needle: str) -> None:
    from pice.shared.engine.config import EngineConfig

    with pytest.raises(ValueError, match=re.escape(needle)):
        EngineConfig(model="m", **kwargs)  # type: ignore[arg-type]


def test_engine_config_picks_cpu_float32_here() -> None:
    from pice.shared.engine.config import EngineConfig

    cfg = EngineConfig(model="m")
    if not torch.cuda.is_available():
        assert (cfg.device, cfg.dtype) == ("cpu", "float32")
