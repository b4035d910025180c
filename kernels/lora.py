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
Scaling is folded into B when an adapter is written to its slot.

Compressed adapters (Compress then Serve, pice.shared.lora.compress): a cluster's shared basis
sits in one slot like an adapter (A = Vᵀ, B = U) and each token of a compressed adapter carries
its core: between the shrink (x V, once per cluster) and the expand (· Uᵀ, once per cluster) the
token's rank vector is multiplied by its Σ (batched r x r) or scaled by its σ (JD-Diag). Tokens
of uncompressed adapters and base-only tokens ride in the same batch untouched by the cores.

Decode takes the cores per grid cell (`CellCores`): every cell of the step's [span, per_slot]
grid has an r x r core (a JD-Diag σ as its diagonal, the identity for a cell of an uncompressed
adapter, anything for an empty cell), so one batched matmul per (layer, group) applies them all,
with no gather or scatter of rank vectors. Prefill takes `Cores` (positions and their cores: a
prefill has many tokens per core)."""

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


@dataclass(frozen=True)
class Cores:
    """The step's per-token cores for one (layer, group): the positions that carry one (batch
    rows in prefill, cells of the [span * per_slot] grid in decode) and their cores, gathered
    once per step: full [k, n, r, r] (Σ per sub-projection) and diag [k', n, r] (σ)."""

    full_pos: torch.Tensor  # [k] int64
    full: torch.Tensor  # [u, n, r, r]: u = k, or the distinct cores when full_of is given
    diag_pos: torch.Tensor  # [k'] int64
    diag: torch.Tensor  # [u', n, r]
    full_of: torch.Tensor | None = None  # [k] int64: position -> row of `full` (else 1:1)
    diag_of: torch.Tensor | None = None  # [k'] int64


@dataclass(frozen=True)
class CellCores:
    """Decode: one core per cell of the [span, per_slot] grid, per sub-projection."""

    core: torch.Tensor  # [P, n, r, r], P = span * per_slot (a view of the step's gathered table)


def apply_cell_cores(tp: torch.Tensor, cores: CellCores) -> torch.Tensor:
    """tp: [n, span, m, R] the grid's rank vectors per sub-projection; returns them with each
    cell's core applied to its first r ranks (those beyond r, only ever non-zero for cells of
    uncompressed adapters of a larger rank, pass through)."""
    n, span, m, r_max = tp.shape
    r = min(cores.core.shape[-1], r_max)
    core = cores.core[..., :r, :r].transpose(0, 1).reshape(n * span * m, r, r)  # [n * P, r, r]
    if r == r_max:
        return torch.bmm(core, tp.reshape(n * span * m, r, 1)).view(n, span, m, r)
    out = tp.clone()
    out[..., :r] = torch.bmm(core, tp[..., :r].reshape(n * span * m, r, 1)).view(n, span, m, r)
    return out


def apply_cores_(t: torch.Tensor, cores: Cores) -> None:
    """t: [P, R, n] shrunk rank vectors (P positions), updated in place: t_p <- Σ_p t_p for
    every position with a core (per sub-projection j), σ_p * t_p for JD-Diag ones."""
    if cores.full_pos.numel():
        r = min(cores.full.shape[-1], t.shape[1])
        sel = t[cores.full_pos, :r]  # [k, r, n]
        k, u = sel.shape[0], cores.full.shape[0]
        if cores.full_of is not None and 4 * u <= k:
            # prefill: few distinct cores for many tokens: every core on every token in one
            # GEMM per sub-projection ([k, r] @ [r, u * r]), then each token's own block
            out = torch.empty_like(sel)
            own = (torch.arange(k, device=t.device), cores.full_of)
            for j in range(sel.shape[2]):
                w = cores.full[:, j, :r, :r].reshape(u * r, r)  # [u * r, r]
                out[:, :, j] = (sel[:, :, j] @ w.T).view(k, u, r)[own]
            t[cores.full_pos, :r] = out
        else:
            full = cores.full if cores.full_of is None else cores.full[cores.full_of]
            t[cores.full_pos, :r] = torch.einsum("knrs,ksn->krn", full[..., :r, :r], sel)
    if cores.diag_pos.numel():
        r = min(cores.diag.shape[-1], t.shape[1])
        diag = cores.diag if cores.diag_of is None else cores.diag[cores.diag_of]
        t[cores.diag_pos, :r] = t[cores.diag_pos, :r] * diag[..., :r].transpose(1, 2)


def sgmv_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bs: Sequence[torch.Tensor],
          segments: Sequence[Segment], cores: Cores | None = None) -> None:
    """Segmented gather matmul (prefill): per segment, the adapter's true rank only (a
    cluster's tokens form one segment: one shrink and one expand for all of them).

    y: [T, sum(out_j)] updated in place; x: [T, in]; a: [S, R, n, in]; bs[j]: [S, out_j, R];
    cores: positions are batch rows."""
    n = a.shape[2]
    ts = []
    for seg in segments:
        rows = slice(seg.start, seg.end)
        a_s = a[seg.slot, :seg.rank].reshape(seg.rank * n, -1)  # [r * n, in]
        ts.append((x[rows] @ a_s.T).view(-1, seg.rank, n))  # [t, r, n]
    if cores is not None and segments:
        # every segment's rank vectors in one [T, R_seg, n] buffer so the cores apply at once
        width = max(seg.rank for seg in segments)
        t_all = x.new_zeros(x.shape[0], width, n)
        for seg, t in zip(segments, ts, strict=True):
            t_all[seg.start:seg.end, :seg.rank] = t
        apply_cores_(t_all, cores)
        ts = [t_all[seg.start:seg.end, :seg.rank] for seg in segments]
    for seg, t in zip(segments, ts, strict=True):
        rows = slice(seg.start, seg.end)
        tp = t.permute(2, 0, 1).contiguous() if n > 1 else t.squeeze(2)[None]  # [n, t, r]
        col = 0
        for j, b in enumerate(bs):
            out = b.shape[1]
            # [t, r] @ [r, out_j] added into y's rows of the segment, column block j
            y[rows, col:col + out].addmm_(tp[j], b[seg.slot, :, :seg.rank].T)
            col += out


@dataclass(frozen=True)
class DecodeLayout:
    """Where each decode token's LoRA term comes from, built once per step from the per-token
    slot index: the tokens with an adapter, and their (slot - lo, position among the tokens of
    that slot) in a [span, per_slot] grid over the slot range [lo, lo + span)."""

    rows: torch.Tensor  # [t] int64 batch rows that use an adapter
    rel: torch.Tensor  # [t] int64 slot - lo
    pos: torch.Tensor  # [t] int64 position among its slot's tokens
    lo: int
    span: int
    per_slot: int

    @staticmethod
    def build(index: Sequence[int], device: torch.device) -> DecodeLayout | None:
        used = [(row, s) for row, s in enumerate(index) if s >= 0]
        if not used:
            return None
        lo = min(s for _, s in used)
        seen: dict[int, int] = {}
        pos = []
        for _, s in used:
            pos.append(seen.get(s, 0))
            seen[s] = pos[-1] + 1

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return DecodeLayout(tensor([r for r, _ in used]), tensor([s - lo for _, s in used]),
                            tensor(pos), lo, max(seen) - lo + 1, max(seen.values()))


def bgmv_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bs: Sequence[torch.Tensor],
          layout: DecodeLayout, cores: Cores | CellCores | None = None) -> None:
    """Batched gather matmul (decode): every token at its slot, in one batched matmul per
    matrix over the slot range, reading each resident adapter once (no per-token copies of
    the weights) at the padded rank R.

    y: [T, sum(out_j)] updated in place; x: [T, in]; a: [S, R, n, in]; bs[j]: [S, out_j, R];
    cores: per cell (CellCores), or at positions (Cores) that are cells (slot - lo) * per_slot +
    position of the [span, per_slot] grid."""
    lo, span, m = layout.lo, layout.span, layout.per_slot
    r_max, n, fan_in = a.shape[1], a.shape[2], a.shape[3]
    xs = x.new_zeros(span, m, fan_in)  # [span, m, in] the tokens, grouped by slot
    xs[layout.rel, layout.pos] = x[layout.rows]
    a_v = a[lo:lo + span].view(span, r_max * n, fan_in)  # [span, R * n, in], a view
    t = torch.bmm(xs, a_v.transpose(1, 2)).view(span, m, r_max, n)  # [span, m, R, n]
    if isinstance(cores, Cores):
        apply_cores_(t.view(span * m, r_max, n), cores)
    # [n, span, m, R]: each sub-projection's rank vectors contiguous (a strided bmm operand
    # costs about twice as much on the CPU)
    tp = t.permute(3, 0, 1, 2).contiguous() if n > 1 else t.squeeze(3)[None]
    if isinstance(cores, CellCores):
        tp = apply_cell_cores(tp, cores)
    col = 0
    for j, b in enumerate(bs):
        out = b.shape[1]
        # [span, m, R] @ [span, R, out] -> [span, m, out]; each token's row added into y
        delta = torch.bmm(tp[j], b[lo:lo + span].transpose(1, 2))
        y[:, col:col + out].index_add_(0, layout.rows, delta[layout.rel, layout.pos])
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


def compressed_reference(x: torch.Tensor, u: Sequence[torch.Tensor], v: Sequence[torch.Tensor],
                         sigma: Sequence[torch.Tensor]) -> torch.Tensor:
    """The per-token definition of a compressed adapter (tests): token i adds, for each
    sub-projection j, U_j Σ_ij V_jᵀ x_i. u[j]: [out_j, r]; v[j]: [in, r]; sigma[j]: [T, r, r]
    (or [T, r] diagonal). Returns the delta [T, sum(out_j)]."""
    parts = []
    for uj, vj, sj in zip(u, v, sigma, strict=True):
        core = sj if sj.dim() == 3 else torch.diag_embed(sj)  # [T, r, r]
        parts.append(torch.einsum("or,trs,is,ti->to", uj, core, vj, x))
    return torch.cat(parts, 1)
