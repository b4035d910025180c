"""Batched LoRA kernels against the per-token definition: mixed ranks (zero-padded slots),
fused sub-projections, base-only tokens left untouched."""

from __future__ import annotations

import pytest
import torch

from pice.kernels.lora import DecodeLayout, Segment, bgmv_, lora_reference, sgmv_

SLOTS, R, IN = 4, 8, 32
OUTS = [32, 16, 16]  # e.g. q, k, v fused
RANKS = [8, 1, 3, 5]


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
