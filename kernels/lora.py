"""Batched multi-LoRA (Punica / S-LoRA style), torch reference for the CPU.

The base projection runs once for the whole batch (`y = base(x)`, by the caller, whatever kernel
it uses); these functions add each token's low-rank term in place: y += (x @ A_s^T) @ B_s^T for
the slot s of the token's adapter. Tokens without an adapter are left alone, so base-only
requests ride in the same batch.

Slot buffers hold every resident adapter zero-padded to the maximum rank R, so adapters of
different ranks share one buffer (the zero rows add nothing). A fused projection (q/k/v, or
gate/up) keeps its n sub-projections' A matrices interleaved on the rank axis:
  a: [S, R, n, in]   so a[s, :r] is contiguous and one matmul shrinks all n at rank r,
  bs[j]: [S, out_j, R] for sub-projection j, whose output is column block j of y.
Scaling is folded into B when an adapter is written to its slot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of the batch use slot `slot`, whose adapter has rank `rank`."""

    start: int
    end: int
    slot: int
    rank: int


def sgmv_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bs: Sequence[torch.Tensor],
          segments: Sequence[Segment]) -> None:
    """Segmented gather matmul (prefill): per segment, the adapter's true rank only.

    y: [T, sum(out_j)] updated in place; x: [T, in]; a: [S, R, n, in]; bs[j]: [S, out_j, R]."""
    n = a.shape[2]
    for seg in segments:
        rows = slice(seg.start, seg.end)
        a_s = a[seg.slot, :seg.rank].reshape(seg.rank * n, -1)  # [r * n, in]
        t = (x[rows] @ a_s.T).view(-1, seg.rank, n)  # [t, r, n]
        col = 0
        for j, b in enumerate(bs):
            out = b.shape[1]
            # [t, r] @ [r, out_j] added into y's rows of the segment, column block j
            y[rows, col:col + out].addmm_(t[:, :, j], b[seg.slot, :, :seg.rank].T)
            col += out


def bgmv_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bs: Sequence[torch.Tensor],
          index: torch.Tensor) -> None:
    """Batched gather matmul (decode): token i uses slot index[i] (-1: no adapter), all at the
    padded rank R in one batched matmul per matrix.

    y: [T, sum(out_j)] updated in place; x: [T, in]; a: [S, R, n, in]; bs[j]: [S, out_j, R];
    index: [T] int64."""
    rows = (index >= 0).nonzero().squeeze(1)  # [t] tokens with an adapter
    if rows.numel() == 0:
        return
    slots = index[rows]  # [t]
    r_max, n = a.shape[1], a.shape[2]
    a_g = a[slots].view(rows.numel(), r_max * n, -1)  # [t, R * n, in] gathered per token
    t = torch.bmm(a_g, x[rows].unsqueeze(2)).view(-1, r_max, n)  # [t, R, n]
    col = 0
    for j, b in enumerate(bs):
        out = b.shape[1]
        delta = torch.bmm(b[slots], t[:, :, j:j + 1]).squeeze(2)  # [t, out_j]
        y[:, col:col + out].index_add_(0, rows, delta)
        col += out


def lora_reference(x: torch.Tensor, a: torch.Tensor, bs: Sequence[torch.Tensor],
                   index: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """The plain per-token definition both kernels must equal (tests): returns the delta
    [T, sum(out_j)] where token i adds sum over its slot's rank of B_j A_j x_i."""
    outs = [b.shape[1] for b in bs]
    delta = x.new_zeros(x.shape[0], sum(outs))
    for i, s in enumerate(index.tolist()):
        if s < 0:
            continue
        r, col = ranks[s], 0
        for j, b in enumerate(bs):
            delta[i, col:col + outs[j]] = b[s, :, :r] @ (a[s, :r, j] @ x[i])
            col += outs[j]
    return delta
