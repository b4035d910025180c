"""Clustering adapters into shared bases, and choosing rank and cluster count by an error budget.

One cluster per adapter across every layer and module. Initialisation: a single JD-Full basis
over the whole group, each adapter's Σ_i flattened across modules, L2-normalised, k-means++
(seeded). Refinement: fit a basis per cluster, reassign each adapter to the basis that
reconstructs it best (sum over modules of relative squared error), until the assignment stops
changing (at most `rounds`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pice.shared.lora.compress.jd import Basis, Method, fit, fit_full, project

Module = tuple[int, str]  # (layer, projection)


@dataclass
class Stack:
    """A group's adapters, per module: a [n, R, in], b [n, out, R] (zeros where an adapter
    does not target the module), and ‖ΔW_i‖² [n]."""

    names: list[str]
    modules: dict[Module, tuple[torch.Tensor, torch.Tensor]]
    norm2: dict[Module, torch.Tensor] = field(default_factory=dict)

    def subset(self, idx: list[int]) -> Stack:
        sel = torch.tensor(idx, dtype=torch.long)
        return Stack([self.names[i] for i in idx],
                     {m: (a[sel], b[sel]) for m, (a, b) in self.modules.items()},
                     {m: n[sel] for m, n in self.norm2.items()})


@dataclass
class Fit:
    """A fitted configuration: per cluster a basis per module; per adapter its cluster, its
    core per module, and relative Frobenius error per module [n, M] (0 where ΔW_i = 0)."""

    method: Method
    rank: int
    assign: list[int]
    bases: list[dict[Module, Basis]]
    cores: dict[Module, torch.Tensor]  # [n, r, r] (full) or [n, r] (diag), own cluster's basis
    rel: torch.Tensor  # [n, M] in the order of Stack.modules

    @property
    def worst(self) -> torch.Tensor:
        """Per adapter: the largest relative error over its modules [n]."""
        return self.rel.max(1).values if self.rel.numel() else torch.zeros(len(self.assign))


def _kmeans_once(x: torch.Tensor, k: int, gen: torch.Generator,
                 iters: int) -> tuple[float, torch.Tensor]:
    n = x.shape[0]
    centers = [int(torch.randint(n, (1,), generator=gen))]
    d2 = (x - x[centers[0]]).pow(2).sum(1)
    for _ in range(1, k):
        if float(d2.sum()) <= 0:
            break
        centers.append(int(torch.multinomial(d2 / d2.sum(), 1, generator=gen)))
        d2 = torch.minimum(d2, (x - x[centers[-1]]).pow(2).sum(1))
    c = x[centers].clone()  # [k, f]
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(x, c).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
        for j in range(c.shape[0]):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(0)
    inertia = float((x - c[assign]).pow(2).sum())
    return inertia, assign


def _kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 50, restarts: int = 8) -> list[int]:
    """k-means++ on the rows of x [n, f] (seeded); the best of `restarts` by inertia."""
    gen = torch.Generator().manual_seed(seed)
    _, assign = min((_kmeans_once(x, k, gen, iters) for _ in range(restarts)),
                    key=lambda t: t[0])
    return [int(a) for a in assign]


def _fit_bases(stack: Stack, assign: list[int], k: int, method: Method, rank: int,
               iters: int) -> list[dict[Module, Basis]]:
    bases = []
    for c in range(k):
        idx = torch.tensor([i for i, a in enumerate(assign) if a == c], dtype=torch.long)
        bases.append({m: fit(method, a[idx], b[idx], rank, iters)
                      for m, (a, b) in stack.modules.items()})
    return bases


def _rel_sq(err2: torch.Tensor, norm2: torch.Tensor) -> torch.Tensor:
    return torch.where(norm2 > 0, err2 / norm2.clamp_min(1e-300), torch.zeros_like(err2))


def _scores(stack: Stack, bases: list[dict[Module, Basis]], method: Method) -> torch.Tensor:
    """[n, k]: Σ over modules of each adapter's relative squared error in each basis."""
    n = len(stack.names)
    out = torch.zeros(n, len(bases), dtype=torch.float64)
    for c, basis in enumerate(bases):
        for m, (a, b) in stack.modules.items():
            _, err2 = project(method, basis[m], a, b)
            out[:, c] += _rel_sq(err2, stack.norm2[m]).double()
    return out


def finish(stack: Stack, assign: list[int], method: Method, rank: int,
           iters: int = 10) -> Fit:
    """Bases for a given assignment, and each adapter's core and errors in its own basis."""
    used = sorted(set(assign))
    remap = {c: j for j, c in enumerate(used)}
    assign = [remap[c] for c in assign]
    bases = _fit_bases(stack, assign, len(used), method, rank, iters)
    n = len(stack.names)
    cores: dict[Module, torch.Tensor] = {}
    rel = torch.zeros(n, len(stack.modules), dtype=torch.float64)
    at = torch.tensor(assign, dtype=torch.long)
    for j, (m, (a, b)) in enumerate(stack.modules.items()):
        r = bases[0][m].rank
        core = a.new_zeros((n, r, r) if method == "full" else (n, r))
        for c, basis in enumerate(bases):
            idx = (at == c).nonzero().flatten()
            sigma, err2 = project(method, basis[m], a[idx], b[idx])
            core[idx] = sigma
            rel[idx, j] = _rel_sq(err2, stack.norm2[m][idx]).double().sqrt()
        cores[m] = core
    return Fit(method, rank, assign, bases, cores, rel)


def cluster(stack: Stack, k: int, method: Method, rank: int, *, rounds: int = 10,
            iters: int = 10, seed: int = 0) -> Fit:
    """k clusters (fewer if some empty out) at rank `rank`."""
    n = len(stack.names)
    k = max(1, min(k, n))
    if k == 1:
        return finish(stack, [0] * n, method, rank, iters)
    feats = []
    # Σ features from one shared JD-Full basis, wide enough (k x rank, at most 128) to tell the
    # clusters' subspaces apart, on the middle layer's modules (as the paper picks the cluster
    # count on a middle module): the assignment is refined on every module afterwards
    layers = sorted({layer for layer, _ in stack.modules})
    mid = layers[len(layers) // 2]
    for m in [m for m in stack.modules if m[0] == mid][:4]:
        a, b = stack.modules[m]
        basis = fit_full(a, b, min(k * rank, 128), iters=2)
        sig = (basis.u.T @ b) @ (a @ basis.v)  # [n, kr, kr]
        # each adapter's energy along every shared direction (row and column norms of Σ_i):
        # adapters in one subspace load the same directions, while their raw Σ are unrelated
        # (random cores within one block)
        feats += [sig.pow(2).sum(2), sig.pow(2).sum(1)]
    x = torch.cat([f / f.norm(dim=1, keepdim=True).clamp_min(1e-30) for f in feats], 1)
    x = x.double() / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    assign = _kmeans(x, k, seed)
    for _ in range(rounds):
        used = sorted(set(assign))
        assign = [used.index(c) for c in assign]
        bases = _fit_bases(stack, assign, len(used), method, rank, iters)
        new = [int(c) for c in _scores(stack, bases, method).argmin(1)]
        if new == assign:
            break
        assign = new
    return finish(stack, assign, method, rank, iters)


def param_count(stack: Stack, fit_: Fit, compressed: torch.Tensor) -> tuple[int, int]:
    """(parameters of the original LoRA factors, parameters after compression) where only the
    adapters flagged in `compressed` [n] bool are compressed (the rest stay as they are)."""
    before = after = 0
    ks = len(fit_.bases)
    for m, (a, b) in stack.modules.items():
        ranks = ((a.abs().sum(2) > 0) | (b.abs().sum(1) > 0)).sum(1)  # [n] true rank
        per = ranks * (a.shape[2] + b.shape[1])
        before += int(per.sum())
        after += int(per[~compressed].sum())
        r = fit_.bases[0][m].rank
        after += ks * r * (a.shape[2] + b.shape[1])
        after += int(compressed.sum()) * (r * r if fit_.method == "full" else r)
    return before, after
