"""Joint diagonalisation of LoRA deltas (Compress then Serve), for one (layer, module) at a time.

Every adapter i contributes ΔW_i = B_i A_i (scaling folded into B), kept in factored form
(never an out x in matrix): a: [n, R, in], b: [n, out, R] (ranks zero-padded to R).

- JD-Full: orthonormal U [out, r], V [in, r] shared, full Σ_i = Uᵀ ΔW_i V [r, r]; fitted by
  alternating top-r subspace updates (HOOI / Tucker-2): U ← top-r left singular vectors of
  [ΔW_1 V | ... | ΔW_n V], V ← the same of [ΔW_1ᵀ U | ...]. Error ‖ΔW_i‖² − ‖Σ_i‖².
- JD-Diag: U, V unconstrained, Σ_i = diag(σ_i); alternating least squares (σ closed form, then
  U, then V), started from the JD-Full basis.

Everything is float64 on the CPU (the factors are small)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Method = Literal["full", "diag"]
_RIDGE = 1e-10


@dataclass
class Basis:
    """One cluster's shared basis for one module: U [out, r], V [in, r]."""

    u: torch.Tensor
    v: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])


def sq_norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖B_i A_i‖²_F per adapter: [n] from a [n, R, in], b [n, out, R]."""
    return ((b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))).sum((1, 2))


def _top_left(y: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r left singular vectors of y [d, m]: [d, r] orthonormal (r <= d)."""
    d, m = y.shape
    if m <= d:
        u, _, _ = torch.linalg.svd(y, full_matrices=False)  # [d, m]
        if u.shape[1] >= r:
            return u[:, :r]
        # fewer columns than r: complete with an orthonormal complement
        q, _ = torch.linalg.qr(torch.cat([u, torch.eye(d, dtype=y.dtype)], 1))
        return q[:, :r]
    _, vecs = torch.linalg.eigh(y @ y.T)  # ascending eigenvalues
    return vecs.flip(1)[:, :r]


def effective_rank(r: int, fan_in: int, fan_out: int) -> int:
    return min(r, fan_in, fan_out)


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x)[0]


def _power_u(a: torch.Tensor, b: torch.Tensor, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One subspace-iteration step towards the top-r left singular vectors of
    [ΔW_i V]_i: orth(Σ_i ΔW_i V Vᵀ ΔW_iᵀ U), never forming the wide matrix."""
    m = a @ v  # [n, R, r]
    t = b @ (m @ (m.transpose(1, 2) @ (b.transpose(1, 2) @ u)))  # [n, out, r]
    return _orth(t.sum(0))


def fit_full(a: torch.Tensor, b: torch.Tensor, r: int, iters: int = 10,
             exact: bool | None = None) -> Basis:
    """HOOI. Small problems: exact top-r subspaces at every step, started from the top-r right
    subspace of Σ_i ΔW_iᵀ ΔW_i. Large ones (n R well above the dimensions): two
    subspace-iteration steps per update instead (as the reference code's svd_lowrank), from a
    seeded random start, so no d x d Gram of n R columns is formed."""
    n, big_r, fan_in = a.shape
    fan_out = b.shape[1]
    r = effective_rank(r, fan_in, fan_out)
    if not exact if exact is not None else n * big_r > max(fan_in, fan_out):
        gen = torch.Generator().manual_seed(0)
        v = _orth(torch.randn(fan_in, r, generator=gen, dtype=a.dtype))
        u = _orth(torch.randn(fan_out, r, generator=gen, dtype=a.dtype))
        at, bt = b.transpose(1, 2), a.transpose(1, 2)  # the transposed problem: ΔW_iᵀ = Aᵀ Bᵀ
        btb = at @ b  # [n, R, R] = B_iᵀ B_i
        for _ in range(2):  # V towards the top subspace of Σ ΔW_iᵀ ΔW_i
            v = _orth((bt @ (btb @ (a @ v))).sum(0))
        for _ in range(iters):
            for _ in range(2):
                u = _power_u(a, b, v, u)
            for _ in range(2):
                v = _power_u(at, bt, u, v)
        return Basis(u, v)
    rb = torch.linalg.qr(b, mode="r")[1]  # [n, R, R]: ΔW_iᵀ ΔW_i = A_iᵀ R_iᵀ R_i A_i
    z = (a.transpose(1, 2) @ rb.transpose(1, 2))  # [n, in, R]
    v = _top_left(z.permute(1, 0, 2).reshape(fan_in, n * big_r), r)  # [in, r]
    u = v.new_zeros(fan_out, r)
    for _ in range(iters):
        y = b @ (a @ v)  # [n, out, r] = ΔW_i V
        u = _top_left(y.permute(1, 0, 2).reshape(fan_out, n * r), r)
        w = a.transpose(1, 2) @ (b.transpose(1, 2) @ u)  # [n, in, r] = ΔW_iᵀ U
        v = _top_left(w.permute(1, 0, 2).reshape(fan_in, n * r), r)
    return Basis(u, v)


def core_full(basis: Basis, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_i = Uᵀ ΔW_i V: [n, r, r]."""
    return (basis.u.T @ b) @ (a @ basis.v)


def _diag_terms(basis: Basis, a: torch.Tensor,
                b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M = UᵀU ⊙ VᵀV [r, r] and rhs_i = diag(Uᵀ ΔW_i V) [n, r]."""
    m = (basis.u.T @ basis.u) * (basis.v.T @ basis.v)
    rhs = torch.diagonal(core_full(basis, a, b), dim1=1, dim2=2)
    return m, rhs


def core_diag(basis: Basis, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Least-squares σ_i for a fixed U, V: [n, r]."""
    m, rhs = _diag_terms(basis, a, b)
    ridge = _RIDGE * (torch.diagonal(m).mean() + 1.0)
    return torch.linalg.solve(m + ridge * torch.eye(m.shape[0], dtype=m.dtype), rhs.T).T


def _unit_cols(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=0).clamp_min(1e-30)


def fit_diag(a: torch.Tensor, b: torch.Tensor, r: int, iters: int = 10) -> Basis:
    """ALS for U diag(σ_i) Vᵀ, from the JD-Full basis; U and V columns kept at unit norm."""
    basis = fit_full(a, b, r, iters=max(2, iters // 2))
    for _ in range(iters):
        s = core_diag(basis, a, b)  # [n, r]
        ss = s.T @ s  # [r, r] = Σ_i σ_i σ_iᵀ
        av = a @ basis.v  # [n, R, r]
        num_u = (b @ (av * s[:, None, :])).sum(0)  # Σ_i ΔW_i V S_i: [out, r]
        den = (basis.v.T @ basis.v) * ss
        u = _unit_cols(torch.linalg.solve(den + _RIDGE * torch.eye(den.shape[0],
                                                                   dtype=den.dtype),
                                          num_u.T).T)
        bu = b.transpose(1, 2) @ u  # [n, R, r]
        num_v = (a.transpose(1, 2) @ (bu * s[:, None, :])).sum(0)  # Σ_i ΔW_iᵀ U S_i
        den = (u.T @ u) * ss
        v = _unit_cols(torch.linalg.solve(den + _RIDGE * torch.eye(den.shape[0],
                                                                   dtype=den.dtype),
                                          num_v.T).T)
        basis = Basis(u, v)
    return basis


def fit(method: Method, a: torch.Tensor, b: torch.Tensor, r: int, iters: int = 10) -> Basis:
    return fit_full(a, b, r, iters) if method == "full" else fit_diag(a, b, r, iters)


def project(method: Method, basis: Basis, a: torch.Tensor,
            b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each adapter's core in this basis and its squared error ‖ΔW_i − U Σ_i Vᵀ‖²:
    ([n, r, r] or [n, r], [n])."""
    norm2 = sq_norms(a, b)
    if method == "full":
        sigma = core_full(basis, a, b)
        err2 = norm2 - sigma.pow(2).sum((1, 2))
    else:
        sigma = core_diag(basis, a, b)
        m, rhs = _diag_terms(basis, a, b)
        err2 = norm2 - 2 * (sigma * rhs).sum(1) + ((sigma @ m) * sigma).sum(1)
    return sigma, err2.clamp_min(0.0)
