"""Attention over a paged KV cache.

The cache of one layer is two tensors [num_blocks, block_size, kv_heads, head_dim]; a sequence
owns a list of blocks (its block table). Each step writes the new tokens' K/V into their slots,
then every query attends over its sequence's context gathered through the block table. On the
CPU in float32 the row-independent kernel (csrc/rowwise.cpp) computes every query alone over
its own keys, so a request's numbers do not depend on its batch; elsewhere (GPU, half
precision, no compiler) torch's SDPA runs per sequence (prefill) or padded (decode)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pice.kernels.rowwise import rowwise_kernel


@dataclass
class AttentionMetadata:
    """Per-step layout, built once by the model runner and shared by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache slot of each new token's K/V
    query_lens: list[int]  # [B] new tokens per sequence (queries), in batch order
    context_lens: list[int]  # [B] tokens each sequence attends over (cached + new)
    context_slots: list[torch.Tensor]  # B × [context_len] int64 flat slots of the context
    positions: torch.Tensor  # [num_tokens] int64 absolute position of each query token
    decode_slots: torch.Tensor | None = None  # [B, max_ctx] int64 context slots, padded with 0
    decode_valid: torch.Tensor | None = None  # [B, max_ctx] bool, False on padding
    seq_index: torch.Tensor | None = None  # [num_tokens] int64: the sequence of each query

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens)


def build_metadata(block_tables: list[list[int]], context_lens: list[int], query_lens: list[int],
                   block_size: int, device: torch.device) -> AttentionMetadata:
    """Slots and gather indices for a batch. block_tables[b] covers context_lens[b] tokens; the
    last query_lens[b] of them are new this step."""
    slots, positions, ctx_slots = [], [], []
    for table, ctx, q in zip(block_tables, context_lens, query_lens, strict=True):
        pos = torch.arange(ctx, dtype=torch.long)
        blocks = torch.tensor(table, dtype=torch.long)[pos // block_size]
        seq_slots = blocks * block_size + pos % block_size  # [ctx]
        ctx_slots.append(seq_slots.to(device))
        slots.append(seq_slots[ctx - q:])
        positions.append(pos[ctx - q:])
    meta = AttentionMetadata(torch.cat(slots).to(device), list(query_lens), list(context_lens),
                             ctx_slots, torch.cat(positions).to(device))
    meta.seq_index = torch.repeat_interleave(torch.arange(len(query_lens)),
                                             torch.tensor(query_lens, dtype=torch.long)).to(device)
    width = max(context_lens)
    dec = torch.zeros(len(context_lens), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(context_lens), width, dtype=torch.bool, device=device)
    for b, s in enumerate(ctx_slots):
        dec[b, : s.numel()] = s
        valid[b, : s.numel()] = True
    meta.decode_slots, meta.decode_valid = dec, valid
    return meta


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # k, v: [num_tokens, kv_heads, head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim] (new tokens).
    Returns [num_tokens, heads, head_dim]. `sliding_window` w: a query at position p sees keys
    at positions (p - w, p]."""
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    k_flat = k_cache.view(-1, *k_cache.shape[2:])  # [slots, kv_heads, head_dim]
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    kernel = rowwise_kernel()
    if (kernel is not None and q.device.type == "cpu" and q.dtype == torch.float32
            and meta.decode_slots is not None and meta.seq_index is not None):
        # every sequence's context [B, max_ctx, kv_heads, hd]; each query reads only its own
        kb = k_flat[meta.decode_slots].float()
        vb = v_flat[meta.decode_slots].float()
        out: torch.Tensor = kernel.attention(q, kb, vb, meta.seq_index, meta.positions, scale,
                                             sliding_window or 0)
        return out
    if meta.is_decode:
        return _decode(q, k_flat, v_flat, meta, scale, sliding_window)
    out = torch.empty_like(q)
    start = 0
    for qlen, ctx, slots in zip(meta.query_lens, meta.context_lens, meta.context_slots,
                                strict=True):
        qi = q[start:start + qlen].transpose(0, 1)  # [heads, qlen, head_dim]
        ki = k_flat[slots].transpose(0, 1)  # [kv_heads, ctx, head_dim]
        vi = v_flat[slots].transpose(0, 1)
        qpos = torch.arange(ctx - qlen, ctx, device=q.device).unsqueeze(1)  # [qlen, 1]
        kpos = torch.arange(ctx, device=q.device).unsqueeze(0)  # [1, ctx]
        mask = kpos <= qpos
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        oi = F.scaled_dot_product_attention(qi, ki.to(q.dtype), vi.to(q.dtype), attn_mask=mask,
                                            scale=scale, enable_gqa=True)
        out[start:start + qlen] = oi.transpose(0, 1)
        start += qlen
    return out


def _decode(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, meta: AttentionMetadata,
            scale: float, sliding_window: int | None) -> torch.Tensor:
    assert meta.decode_slots is not None and meta.decode_valid is not None
    kb = k_flat[meta.decode_slots].transpose(1, 2).to(q.dtype)  # [B, kv_heads, max_ctx, hd]
    vb = v_flat[meta.decode_slots].transpose(1, 2).to(q.dtype)
    mask = meta.decode_valid  # [B, max_ctx]
    if sliding_window is not None:
        kpos = torch.arange(mask.shape[1], device=q.device).unsqueeze(0)  # [1, max_ctx]
        last = torch.tensor(meta.context_lens, device=q.device).unsqueeze(1) - 1  # [B, 1]
        mask = mask & (kpos > last - sliding_window)
    qb = q.unsqueeze(2)  # [B, heads, 1, head_dim]
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None, None, :],
                                         scale=scale, enable_gqa=True)
    return out.squeeze(2)  # [B, heads, head_dim]
