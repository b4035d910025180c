"""The adapter pool: tiers, LRU eviction that never touches a pinned slot, waiting instead of
errors when slots run out, memory returned on removal, no allocation per swap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pice.bench.lora_adapters import write_adapter
from pice.shared.errors import BadRequestError, ConflictError, NotFoundError
from pice.shared.lora.pool import AdapterPool
from tests.shared.lora.test_adapter import SHAPE


def pool(tmp_path: Path, n: int, slots: int = 2, host_bytes: int = 2**30,
         ) -> tuple[AdapterPool, list[str]]:
    p = AdapterPool(SHAPE, num_slots=slots, max_rank=8, host_bytes=host_bytes,
                    dtype=torch.float32, device=torch.device("cpu"))
    names = []
    for i in range(n):
        path = write_adapter(tmp_path / f"a{i}", SHAPE, rank=1 + i % 8, alpha=4,
                             targets=("q_proj", "v_proj", "up_proj"), seed=i)
        names.append(p.add(f"a{i}", path).name)
    return p, names


def acquire(p: AdapterPool, name: str) -> int | None:
    """acquire, letting a background disk read finish first."""
    slot = p.acquire(name)
    for _ in range(100):
        if slot is not None or p.info(name).tier != "disk":
            break
        p.wait_for_load(0.1)
    return slot if slot is not None else p.acquire(name)


def test_lru_eviction_spares_pinned_slots(tmp_path: Path) -> None:
    p, (a, b, c) = pool(tmp_path, 3)
    assert p.info(a).tier == "disk" and p.acquire(a) is None  # first use starts a disk read
    assert acquire(p, a) is not None and acquire(p, b) is not None
    assert p.resident() == {a, b}
    assert acquire(p, c) is None  # both slots pinned: c waits, no error
    p.release(b)
    p.release(a)  # a is now the most recently used
    assert acquire(p, c) is not None
    assert p.resident() == {a, c} and p.stats["evictions"] == 1  # b (LRU) went
    assert p.info(b).tier == "host"  # still cached in RAM


def test_swaps_reuse_the_preallocated_slots(tmp_path: Path) -> None:
    p, names = pool(tmp_path, 5, slots=2)
    assert p.buffers is not None
    ptrs = [t.data_ptr() for layer in p.buffers.a for t in layer.values()]
    for name in names * 2:
        assert acquire(p, name) is not None
        p.release(name)
    assert p.stats["swaps"] >= 8
    assert [t.data_ptr() for layer in p.buffers.a for t in layer.values()] == ptrs


def test_host_tier_is_bounded_by_bytes(tmp_path: Path) -> None:
    p, names = pool(tmp_path, 4, slots=1, host_bytes=1)
    for name in names:
        assert acquire(p, name) is not None
        p.release(name)
    assert len(p.on_host()) == 1  # only the newest read stays in RAM
    assert p.host_used == sum(a.nbytes + b.nbytes for a, b in
                              p._entries[names[-1]].host.weights.values())  # type: ignore[union-attr]


def test_remove_returns_memory_and_refuses_while_in_use(tmp_path: Path) -> None:
    p, (a, b) = pool(tmp_path, 2)
    slot = acquire(p, a)
    assert slot is not None and p.host_used > 0
    p.use(a)
    with pytest.raises(ConflictError, match="in use by 1 request"):
        p.remove(a)
    p.unuse(a)
    p.release(a)
    p.remove(a)
    assert p.host_used == 0 and p.resident() == set() and not p.on_host()
    assert p.buffers is not None
    assert all(t[slot].abs().sum() == 0 for layer in p.buffers.a for t in layer.values())
    assert [i.name for i in p.infos()] == [b]
    with pytest.raises(NotFoundError):
        p.remove(a)
    with pytest.raises(NotFoundError):
        p.use(a)
    assert acquire(p, b) == slot or p.resident() == {b}  # the slot is free for others


def test_names_are_checked(tmp_path: Path) -> None:
    p, (a,) = pool(tmp_path, 1)
    with pytest.raises(ConflictError, match="already exists"):
        p.add(a, tmp_path / "a0")
    with pytest.raises(BadRequestError, match="adapter name"):
        p.add("../x", tmp_path / "a0")
