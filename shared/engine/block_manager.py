"""The KV-cache block pool: allocate, append, free, and share prompt prefixes.

Prefix sharing: each full prompt block is keyed by a hash chained over every token before it, so
two prompts share a block only when everything up to and including it is equal. Shared blocks
are immutable (full, and never the block holding a prompt's last token), so sequences diverge at
the first differing block with no copy needed: that is copy-on-write whose copy never happens.
Freed blocks keep their content and hash until reused (LRU), so a later request with the same
prefix can revive them."""

from __future__ import annotations

from collections import OrderedDict

from pice.shared.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "hash", "ref_count", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU order
        self.hash_to_block: dict[int, int] = {}
        self.cache_hits = 0  # prompt blocks served from the cache (for stats and tests)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation -----------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free >= self.blocks_for(len(seq))  # ignores hits: conservative

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table, f"seq {seq.seq_id} already holds blocks"
        bs = self.block_size
        # Full blocks strictly before the last token may be shared (the last token is always
        # computed, so its logits exist and its block stays private).
        shareable = (len(seq) - 1) // bs if self.prefix_caching else 0
        # The chain starts from the adapter's registration id: K/V computed under one adapter
        # is never shared with another (or with the base model, id 0).
        prev_hash, missed = hash(("lora", seq.lora_uid)) if seq.lora_uid else 0, False
        for i in range(self.blocks_for(len(seq))):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = hash((prev_hash, tokens)) if i < shareable else None
            hit = self.hash_to_block.get(h) if h is not None and not missed else None
            if hit is not None and self.blocks[hit].token_ids == tokens:
                block = self.blocks[hit]
                if block.ref_count == 0:
                    del self.free[hit]
                block.ref_count += 1
                seq.num_cached_tokens += bs
                self.cache_hits += 1
            else:
                missed = True
                block = self._fresh()
                if h is not None:
                    block.hash, block.token_ids = h, tokens
                    self.hash_to_block[h] = block.block_id
            seq.block_table.append(block.block_id)
            if h is not None:
                prev_hash = h

    def _fresh(self) -> Block:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block

    def deallocate(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free[block_id] = None  # most recently freed: reused last
        seq.block_table = []
        seq.num_cached_tokens = 0

    def forget(self, seq: Sequence) -> None:
        """Drop the prefix-cache keys of a sequence's blocks (their content is not trustworthy,
        e.g. the step that was filling them failed)."""
        for block_id in seq.block_table:
            block = self.blocks[block_id]
            if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, ()

    # ---- decode ---------------------------------------------------------------------------------
    def needs_block(self, seq: Sequence) -> bool:
        """The newest token (its K/V computed next step) starts a block the table lacks."""
        return len(seq.block_table) < self.blocks_for(len(seq))

    def can_append(self, seq: Sequence) -> bool:
        return not self.needs_block(seq) or self.num_free >= 1

    def append_slot(self, seq: Sequence) -> None:
        if self.needs_block(seq):
            seq.block_table.append(self._fresh().block_id)
