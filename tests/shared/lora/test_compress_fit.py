"""Joint compression on synthetic adapters: drawn from shared subspaces plus noise the error
falls as the rank grows and clustering recovers the subspaces; mutually orthogonal adapters stay
far from any shared basis and the budget refuses them."""

from __future__ import annotations

import itertools

import torch

from pice.shared.lora.compress.cluster import Stack, cluster
from pice.shared.lora.compress.jd import Basis, fit_diag, fit_full, project, sq_norms

IN, OUT, R = 48, 40, 4


def shared_subspace(n: int, rank: int, noise: float, seed: int, subspaces: int = 1) -> Stack:
    """n rank-R LoRAs, B and A in one of `subspaces` shared rank-`rank` subspaces (+ noise)."""
    g = torch.Generator().manual_seed(seed)
    us = [torch.linalg.qr(torch.randn(OUT, rank, generator=g, dtype=torch.float64))[0]
          for _ in range(subspaces)]
    vs = [torch.linalg.qr(torch.randn(IN, rank, generator=g, dtype=torch.float64))[0]
          for _ in range(subspaces)]
    a = torch.zeros(n, R, IN, dtype=torch.float64)
    b = torch.zeros(n, OUT, R, dtype=torch.float64)
    for i in range(n):
        c = i % subspaces
        a[i] = torch.randn(R, rank, generator=g, dtype=torch.float64) @ vs[c].T \
            + noise * torch.randn(R, IN, generator=g, dtype=torch.float64)
        b[i] = us[c] @ torch.randn(rank, R, generator=g, dtype=torch.float64) \
            + noise * torch.randn(OUT, R, generator=g, dtype=torch.float64)
    mods = {(0, "q_proj"): (a, b)}
    return Stack([f"a{i}" for i in range(n)], mods, {m: sq_norms(*ab) for m, ab in mods.items()})


def orthogonal(n: int) -> Stack:
    """n rank-R LoRAs on mutually orthogonal row and column spaces (n * R <= min(IN, OUT))."""
    g = torch.Generator().manual_seed(7)
    qa = torch.linalg.qr(torch.randn(IN, IN, generator=g, dtype=torch.float64))[0]
    qb = torch.linalg.qr(torch.randn(OUT, OUT, generator=g, dtype=torch.float64))[0]
    a = torch.stack([qa[:, i * R:(i + 1) * R].T for i in range(n)])  # [n, R, IN]
    b = torch.stack([qb[:, i * R:(i + 1) * R] for i in range(n)])  # [n, OUT, R]
    mods = {(0, "q_proj"): (a, b)}
    return Stack([f"o{i}" for i in range(n)], mods, {m: sq_norms(*ab) for m, ab in mods.items()})


def rel_errors(stack: Stack, basis: Basis, method: str) -> torch.Tensor:
    a, b = stack.modules[(0, "q_proj")]
    _, err2 = project(method, basis, a, b)  # type: ignore[arg-type]
    return (err2 / sq_norms(a, b)).sqrt()


def test_projection_error_matches_dense_reconstruction() -> None:
    stack = shared_subspace(6, rank=6, noise=0.05, seed=1)
    a, b = stack.modules[(0, "q_proj")]
    for method, fitter in (("full", fit_full), ("diag", fit_diag)):
        basis = fitter(a, b, 6)
        sigma, err2 = project(method, basis, a, b)  # type: ignore[arg-type]
        core = sigma if method == "full" else torch.diag_embed(sigma)
        dense = b @ a - basis.u @ core @ basis.v.T  # [n, OUT, IN]
        torch.testing.assert_close(err2, dense.pow(2).sum((1, 2)), rtol=1e-6, atol=1e-9)


def test_error_falls_with_rank_on_shared_subspace() -> None:
    stack = shared_subspace(12, rank=8, noise=0.02, seed=0)
    a, b = stack.modules[(0, "q_proj")]
    for method, fitter in (("full", fit_full), ("diag", fit_diag)):
        errs = [float(rel_errors(stack, fitter(a, b, r), method).mean()) for r in (2, 4, 8, 12)]
        assert all(x > y for x, y in itertools.pairwise(errs)), (method, errs)
    assert float(rel_errors(stack, fit_full(a, b, 8), "full").max()) < 0.1


def test_orthogonal_adapters_stay_high_and_budget_refuses() -> None:
    stack = orthogonal(8)  # 8 x rank 4 = 32 <= 40 dims: truly orthogonal
    a, b = stack.modules[(0, "q_proj")]
    for r in (4, 8, 16):
        errs = rel_errors(stack, fit_full(a, b, r), "full")
        # a rank-r basis holds at most r / (n R) of the total energy (Corollary 1)
        assert float(errs.pow(2).mean()) >= 1 - r / 32 - 1e-6
    f = cluster(stack, 1, "full", 8)
    assert int((f.worst <= 0.3).sum()) == 0


def test_clustering_recovers_subspaces() -> None:
    stack = shared_subspace(24, rank=4, noise=0.01, seed=3, subspaces=3)
    one = cluster(stack, 1, "full", 4)
    three = cluster(stack, 3, "full", 4, seed=1)
    assert float(one.worst.median()) > 0.5  # one rank-4 basis cannot hold three subspaces
    assert float(three.worst.max()) < 0.1
    groups = {tuple(i for i, c in enumerate(three.assign) if c == k) for k in range(3)}
    assert groups == {tuple(range(k, 24, 3)) for k in range(3)}


def test_subspace_iteration_matches_exact_fit() -> None:
    """Large groups fit by subspace iteration (no d x d Gram of n R columns): the same
    objective as the exact top-r updates, to within 2%."""
    stack = shared_subspace(60, rank=6, noise=0.05, seed=0, subspaces=3)
    a, b = stack.modules[(0, "q_proj")]
    for r in (4, 12, 18):
        exact = float(rel_errors(stack, fit_full(a, b, r, exact=True), "full").pow(2).mean())
        power = float(rel_errors(stack, fit_full(a, b, r, exact=False), "full").pow(2).mean())
        assert power <= exact * 1.02 + 1e-9
