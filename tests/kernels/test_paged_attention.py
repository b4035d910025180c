"""Paged attention (shuffled block tables, cached prefixes, GQA, sliding window) against dense
causal attention over the same sequences."""

import pytest
import torch
import torch.nn.functional as F

from pice.kernels.paged_attention import build_metadata, paged_attention

HEADS, KV_HEADS, HD, BS, NB = 4, 2, 8, 4, 64


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qlen: int,
          window: int | None) -> torch.Tensor:
    # q: [ctx, heads, hd] (only the last qlen rows are checked); k, v: [ctx, kv_heads, hd]
    ctx = k.shape[0]
    pos = torch.arange(ctx)
    mask = pos[None, :] <= pos[:, None]
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    rep = HEADS // KV_HEADS
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(rep, 1).transpose(0, 1),
        v.repeat_interleave(rep, 1).transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)[ctx - qlen:]


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize(("ctx_lens", "q_lens"), [
    ([5, 9, 1], [5, 9, 1]),  # plain prefill
    ([7, 12, 3], [2, 12, 1]),  # prefill on top of cached prefixes
    ([6, 13, 2], [1, 1, 1]),  # decode
])
def test_matches_dense(ctx_lens: list[int], q_lens: list[int], window: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    k_cache = torch.zeros(NB, BS, KV_HEADS, HD)
    v_cache = torch.zeros(NB, BS, KV_HEADS, HD)
    free = torch.randperm(NB, generator=g).tolist()  # blocks scattered across the pool
    tables, seqs = [], []
    for ctx in ctx_lens:
        tables.append([free.pop() for _ in range((ctx + BS - 1) // BS)])
        seqs.append(tuple(torch.randn(ctx, h, HD, generator=g) for h in (HEADS, KV_HEADS,
                                                                         KV_HEADS)))
    # The cached part of each context is already in the cache.
    pre = build_metadata(tables, [c - q for c, q in zip(ctx_lens, q_lens, strict=True)],
                         [c - q for c, q in zip(ctx_lens, q_lens, strict=True)], BS,
                         torch.device("cpu"))
    if pre.slot_mapping.numel():
        ks = torch.cat([s[1][: c - q] for s, c, q in zip(seqs, ctx_lens, q_lens, strict=True)])
        vs = torch.cat([s[2][: c - q] for s, c, q in zip(seqs, ctx_lens, q_lens, strict=True)])
        k_cache.view(-1, KV_HEADS, HD)[pre.slot_mapping] = ks
        v_cache.view(-1, KV_HEADS, HD)[pre.slot_mapping] = vs
    meta = build_metadata(tables, ctx_lens, q_lens, BS, torch.device("cpu"))
    assert meta.is_decode == all(q == 1 for q in q_lens)
    new = [tuple(t[c - q:] for t in s) for s, c, q in zip(seqs, ctx_lens, q_lens, strict=True)]
    q, k, v = (torch.cat([n[i] for n in new]) for i in range(3))
    out = paged_attention(q, k, v, k_cache, v_cache, meta, scale=HD ** -0.5,
                          sliding_window=window)
    expected = torch.cat([dense(*s, q, window) for s, q in zip(seqs, q_lens, strict=True)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
