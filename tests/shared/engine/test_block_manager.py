import pytest

from pice.shared.engine.block_manager import BlockManager
from pice.shared.engine.sequence import Sequence
from pice.shared.sampling import SamplingParams

P = SamplingParams(max_tokens=8)


def seq(tokens: list[int]) -> Sequence:
    return Sequence(tokens, P)


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(8, 4)
    s = seq(list(range(10)))
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free == 5
    bm.deallocate(s)
    assert bm.num_free == 8 and s.block_table == [] and s.num_cached_tokens == 0


def test_common_prefix_shares_full_blocks_only() -> None:
    bm = BlockManager(16, 4)
    prefix = list(range(100, 110))  # 10 tokens: blocks 0, 1 full; block 2 partial
    a, b = seq([*prefix, 1, 2]), seq([*prefix, 3, 4])
    bm.allocate(a)
    bm.allocate(b)
    assert a.block_table[:2] == b.block_table[:2]  # shared
    assert a.block_table[2] != b.block_table[2]  # diverges at the first differing block
    assert b.num_cached_tokens == 8 and a.num_cached_tokens == 0
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.deallocate(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]


def test_identical_prompt_keeps_last_token_block_private() -> None:
    bm = BlockManager(16, 4)
    a, b = seq(list(range(8))), seq(list(range(8)))  # exactly two full blocks
    bm.allocate(a)
    bm.allocate(b)
    assert b.num_cached_tokens == 4  # the block with the last token is recomputed
    assert a.block_table[0] == b.block_table[0] and a.block_table[1] != b.block_table[1]


def test_prefix_differing_early_shares_nothing_after() -> None:
    bm = BlockManager(16, 4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = seq([1, 2, 3, 4, 0, 6, 7, 8, 9])  # block 1 differs → block 1 and later are private
    bm.allocate(a)
    bm.allocate(b)
    assert b.block_table[0] == a.block_table[0]
    assert set(b.block_table[1:]).isdisjoint(a.block_table)


def test_freed_prefix_is_revived_then_evicted_lru() -> None:
    bm = BlockManager(4, 4)
    a = seq(list(range(9)))
    bm.allocate(a)
    bm.deallocate(a)
    b = seq(list(range(9)))
    bm.allocate(b)
    assert b.num_cached_tokens == 8 and bm.cache_hits == 2
    old_keys = set(bm.hash_to_block)
    bm.deallocate(b)
    c = seq(list(range(50, 66)))  # needs all 4 blocks: the cached ones are reused for it
    bm.allocate(c)
    assert c.num_cached_tokens == 0 and bm.num_free == 0
    assert not old_keys & set(bm.hash_to_block)  # evicted keys no longer resolve


def test_append_slot_adds_a_block_at_the_boundary() -> None:
    bm = BlockManager(4, 4)
    s = seq([1, 2, 3, 4])
    bm.allocate(s)
    s.num_cached_tokens = 4
    s.append(9, 0.0)  # token 5 starts block 2
    assert bm.needs_block(s) and bm.can_append(s)
    bm.append_slot(s)
    assert len(s.block_table) == 2 and not bm.needs_block(s)


def test_forget_drops_cache_keys() -> None:
    bm = BlockManager(8, 4)
    a = seq(list(range(9)))
    bm.allocate(a)
    bm.forget(a)
    bm.deallocate(a)
    b = seq(list(range(9)))
    bm.allocate(b)
    assert b.num_cached_tokens == 0


@pytest.mark.parametrize("n", [1, 4, 5, 16, 17])
def test_blocks_for(n: int) -> None:
    assert BlockManager(1, 4).blocks_for(n) == -(-n // 4)
