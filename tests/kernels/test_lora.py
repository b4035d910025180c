"""Batched LoRA kernels against the per-token definition: mixed ranks (zero-padded slots),
fused sub-projections, base-only tokens left untouched."""

from __future__ import annotations

import pytest
import torch

from pice.kernels.lora import DecodeLayout, Segment, bgmv_, lora_reference, sgmv_

SLOTS, R, IN = 4, 8, 32
OUTS = [32, 16, 16]  # e.g. q, k, v fused
RANKS = [8, 1, 3, 5]
# the compressed path sums U (Σ (Vᵀ x)) in another order than the reference's U Σ Vᵀ x: float32
# rounding of ~200 products of size ~10 (the kernels' reduction order varies with threads)
TOL = {"rtol": 1e-5, "atol": 1e-4}


def slot_buffers(seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(SLOTS, R, len(OUTS), IN, generator=gen)  # [S, R, n, in]
    bs = [torch.randn(SLOTS, out, R, generator=gen) for out in OUTS]  # [S, out_j, R]
    for s, r in enumerate(RANKS):  # zero padding above each slot's rank
        a[s, r:] = 0
        for b in bs:
            b[s, :, r:] = 0
    return a, bs


@pytest.mark.parametrize("index", [[0, 3, -1, 1, 2, 3, -1, 0], [-1, -1], [2], [3, 3, 1, 3]])
def test_bgmv_matches_reference(index: list[int]) -> None:
    a, bs = slot_buffers()
    x = torch.randn(len(index), IN)  # [T, in]
    y0 = torch.randn(len(index), sum(OUTS))  # the base projection's output
    y = y0.clone()
    idx = torch.tensor(index)
    layout = DecodeLayout.build(index, x.device)
    if layout is not None:
        bgmv_(y, x, a, bs, layout)
    torch.testing.assert_close(y, y0 + lora_reference(x, a, bs, idx, RANKS))
    base_rows = idx < 0
    assert torch.equal(y[base_rows], y0[base_rows])


def test_sgmv_uses_true_ranks_and_matches_reference() -> None:
    a, bs = slot_buffers(1)
    # tokens: 3 of slot 2, 2 base, 4 of slot 0, 1 of slot 1
    index = [2, 2, 2, -1, -1, 0, 0, 0, 0, 1]
    segments = [Segment(0, 3, 2, RANKS[2]), Segment(5, 9, 0, RANKS[0]), Segment(9, 10, 1, 1)]
    x = torch.randn(len(index), IN)
    y0 = torch.randn(len(index), sum(OUTS))
    y = y0.clone()
    sgmv_(y, x, a, bs, segments)
    torch.testing.assert_close(y, y0 + lora_reference(x, a, bs, torch.tensor(index), RANKS))
    # padding is never read: garbage above a segment's rank changes nothing
    a[2, RANKS[2]:] = 1e6
    y2 = y0.clone()
    sgmv_(y2, x, a, bs, segments)
    torch.testing.assert_close(y2, y)


def test_reference_is_not_trivial() -> None:
    a, bs = slot_buffers()
    x = torch.randn(2, IN)
    assert lora_reference(x, a, bs, torch.tensor([0, 1]), RANKS).abs().min() > 0


def test_compressed_tokens_mixed_with_plain_and_base() -> None:
    """Slot 1 holds a cluster basis (A = Vᵀ, B = U at rank 5 = RANKS[1] widened): its tokens
    carry their own Σ (full) or σ (diag); the other slots' tokens and base rows are unchanged."""
    from pice.kernels.lora import CellCores, Cores, compressed_reference

    a, bs = slot_buffers(2)
    r = 5
    ranks = [RANKS[0], r, RANKS[2], RANKS[3]]
    gen = torch.Generator().manual_seed(3)
    a[1] = 0
    a[1, :r] = torch.randn(r, len(OUTS), IN, generator=gen)
    for b in bs:
        b[1] = 0
        b[1, :, :r] = torch.randn(b.shape[1], r, generator=gen)
    index = [1, 0, 1, -1, 1, 2, 1]  # tokens 0, 2 full cores; 4, 6 diag cores
    full_tok, diag_tok = [0, 2], [4, 6]
    sig_full = torch.randn(2, len(OUTS), r, r, generator=gen)  # [k, n, r, r]
    sig_diag = torch.randn(2, len(OUTS), r, generator=gen)  # [k, n, r]
    x = torch.randn(len(index), IN)
    y0 = torch.randn(len(index), sum(OUTS))
    # expected: plain tokens by the reference, compressed ones by U Σ Vᵀ x
    idx = torch.tensor([s if s != 1 else -1 for s in index])
    want = y0 + lora_reference(x, a, bs, idx, ranks)
    u = [b[1, :, :r] for b in bs]
    v = [a[1, :r, j].T for j in range(len(OUTS))]
    for toks, sig in ((full_tok, sig_full), (diag_tok, sig_diag)):
        per_j = [sig[:, j] for j in range(len(OUTS))]
        want[toks] += compressed_reference(x[toks], u, v, per_j)

    # decode: grid cells of slot 1 (lo = 0): positions 0..3 among its tokens
    layout = DecodeLayout.build(index, x.device)
    assert layout is not None
    m = layout.per_slot
    cells = lambda toks: torch.tensor([(1 - layout.lo) * m + [0, 2, 4, 6].index(t)  # noqa: E731
                                       for t in toks])
    y = y0.clone()
    bgmv_(y, x, a, bs, layout, Cores(cells(full_tok), sig_full, cells(diag_tok), sig_diag))
    torch.testing.assert_close(y, want, **TOL)

    # decode with a core per cell: Σ, σ on the diagonal, the identity for plain adapters'
    # cells (slot 0's rank 8 > r = 5: its ranks beyond 5 pass through), garbage in empty ones
    grid = torch.randn(layout.span * m, len(OUTS), r, r, generator=gen)  # [P, n, r, r]
    grid[cells(full_tok)] = sig_full
    grid[cells(diag_tok)] = torch.diag_embed(sig_diag)
    for row, s in enumerate(index):
        if s in (0, 2):
            grid[(s - layout.lo) * m + index[:row].count(s)] = torch.eye(r)
    y = y0.clone()
    bgmv_(y, x, a, bs, layout, CellCores(grid))
    torch.testing.assert_close(y, want, **TOL)

    # prefill: batch ordered by slot, one segment per slot; core positions are batch rows
    order = sorted(range(len(index)), key=index.__getitem__)
    xs, ys = x[order], y0[order]
    sidx = [index[i] for i in order]
    segs, start = [], 0
    for s in sorted(set(sidx) - {-1}):
        n_s = sidx.count(s)
        start = sidx.index(s)
        segs.append(Segment(start, start + n_s, s, ranks[s]))
    rows = lambda toks: torch.tensor([order.index(t) for t in toks])  # noqa: E731
    sgmv_(ys, xs, a, bs, segs, Cores(rows(full_tok), sig_full, rows(diag_tok), sig_diag))
    torch.testing.assert_close(ys, want[order], **TOL)
