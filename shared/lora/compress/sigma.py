"""The device table of compressed adapters' cores (Compress then Serve): every registered
compressed adapter's Σ_i, always resident (a few hundred bytes per module), one row per adapter.

Storage is one flat tensor per kind so a step gathers its rows ONCE for every layer and group:
  flat["full"]: [cap, F]  F = Σ over (layer, group) of n_g · r · r  (JD-Full Σ per sub-projection)
  flat["diag"]: [cap, F'] F' = Σ over (layer, group) of n_g · r      (JD-Diag σ)
and each (layer, group) is a view of its column block: [rows, n, r, r] or [rows, n, r]. r is the
largest compressed rank so far; rows of projections an adapter does not target stay zero. Grows
by doubling (a copy, rare: when adapters are compressed); a removed adapter's row is zeroed at
once and reused.

Decode gathers per cell of the step's grid instead (`gather_cells`): one [P, F] tensor in the
"full" layout, each cell's Σ (a σ placed on the diagonal, the identity for a cell of an
uncompressed adapter), so each (layer, group) is a [P, n, r, r] view and one batched matmul."""

from __future__ import annotations

import torch

from pice.kernels.lora import CellCores, Cores
from pice.shared.lora.adapter import ModelShape

# the engine's fused projection groups (as pice.shared.lora.slots.GROUPS), in column order
_GROUPS: dict[str, tuple[str, ...]] = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
                                       "gate_up": ("gate_proj", "up_proj"),
                                       "down": ("down_proj",)}
_GROUP_OF = {p: (g, j) for g, ps in _GROUPS.items() for j, p in enumerate(ps)}
_KINDS = ("full", "diag")


class SigmaTable:
    def __init__(self, shape: ModelShape, dtype: torch.dtype, device: torch.device) -> None:
        self.shape, self.dtype, self.device = shape, dtype, device
        self.rank = 0
        self.groups: set[str] = set()
        self.rows: dict[str, tuple[str, int]] = {}  # name -> (kind "full" | "diag", row)
        self.cap = {k: 0 for k in _KINDS}
        self.free: dict[str, list[int]] = {k: [] for k in _KINDS}
        self.flat: dict[str, torch.Tensor] = {k: torch.zeros(0, 0, dtype=dtype, device=device)
                                              for k in _KINDS}
        # (layer, group) -> first column of its block (the same layout for both kinds' widths)
        self._cols: dict[str, dict[tuple[int, str], int]] = {k: {} for k in _KINDS}
        # the per-cell layout (decode): "full" at the current rank and groups; where each diag
        # column lands in it, and the identity row
        self._cell_cols: dict[tuple[int, str], int] = {}
        self._diag_at = torch.zeros(0, dtype=torch.long, device=device)
        self._eye = torch.zeros(0, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.flat.values())

    def _core_shape(self, kind: str, group: str, rank: int) -> tuple[int, ...]:
        return (len(_GROUPS[group]),) + (rank,) * (2 if kind == "full" else 1)

    def _layout(self, kind: str, rank: int, groups: set[str]) -> tuple[dict[tuple[int, str],
                                                                               int], int]:
        cols, width = {}, 0
        for layer in range(self.shape.num_layers):
            for group in (g for g in _GROUPS if g in groups):
                cols[(layer, group)] = width
                width += int(torch.Size(self._core_shape(kind, group, rank)).numel())
        return cols, width

    def view(self, kind: str, layer: int, group: str, rows: torch.Tensor | None = None
             ) -> torch.Tensor:
        """The block of (layer, group): [cap, n, r, r] / [cap, n, r] (of `rows` if given: a
        gathered [k, F] tensor)."""
        src = self.flat[kind] if rows is None else rows
        shp = self._core_shape(kind, group, self.rank)
        start = self._cols[kind][(layer, group)]
        return src[:, start:start + int(torch.Size(shp).numel())].view(src.shape[0], *shp)

    @property
    def tables(self) -> dict[str, list[dict[str, torch.Tensor]]]:
        """Per kind, per layer, per group: the [cap, n, r(, r)] view (tests, inspection)."""
        return {k: [{g: self.view(k, layer, g) for g in _GROUPS if (layer, g) in self._cols[k]}
                    for layer in range(self.shape.num_layers)] if self.cap[k] else []
                for k in _KINDS}

    def _alloc(self, kind: str, cap: int, rank: int, groups: set[str]) -> None:
        """Reallocate `kind` at cap rows, rank, groups, copying what it held."""
        cols, width = self._layout(kind, rank, groups)
        new = torch.zeros(cap, width, dtype=self.dtype, device=self.device)
        if self.cap[kind]:
            old_rank, dims = self.rank, 2 if kind == "full" else 1
            for layer, group in self._cols[kind]:
                start = cols[(layer, group)]  # its block in the new layout
                shp = self._core_shape(kind, group, rank)
                dst = new[:, start:start + int(torch.Size(shp).numel())].view(cap, *shp)
                cut = (slice(0, self.cap[kind]), slice(None)) + (slice(0, old_rank),) * dims
                dst[cut] = self.view(kind, layer, group)
        self.flat[kind], self._cols[kind], self.cap[kind] = new, cols, cap

    @torch.no_grad()
    def add(self, name: str, kind: str, rank: int,
            cores: dict[tuple[int, str], torch.Tensor]) -> None:
        """cores[(layer, proj)]: [r, r] (full) or [r] (diag), r <= rank. Only the groups some
        compressed adapter targets are allocated."""
        self.remove(name)
        groups = self.groups | {_GROUP_OF[proj][0] for _, proj in cores}
        if rank > self.rank or groups != self.groups:
            new_rank = max(rank, self.rank)
            for k in _KINDS:
                if self.cap[k]:
                    self._alloc(k, self.cap[k], new_rank, groups)
            self.rank, self.groups = new_rank, groups
            self._cell_layout()
        if not self.free[kind]:
            cap = self.cap[kind]
            self._alloc(kind, max(16, 2 * cap), self.rank, self.groups)
            self.free[kind] = list(range(cap, self.cap[kind]))[::-1]
        row = self.free[kind].pop()
        for (layer, proj), core in cores.items():
            group, j = _GROUP_OF[proj]
            r = core.shape[0]
            block = self.view(kind, layer, group)
            block[(row, j) + (slice(0, r),) * core.dim()] = core.to(self.dtype)
        self.rows[name] = (kind, row)

    @torch.no_grad()
    def remove(self, name: str) -> None:
        got = self.rows.pop(name, None)
        if got is not None:
            kind, row = got
            self.flat[kind][row].zero_()
            self.free[kind].append(row)

    def _cell_layout(self) -> None:
        cols, width = self._layout("full", self.rank, self.groups)
        r, diag_at, eye = self.rank, [], torch.zeros(width, dtype=self.dtype)
        for (_, group), start in cols.items():  # the order _layout gives both kinds
            for j in range(len(_GROUPS[group])):
                for i in range(r):
                    at = start + (j * r + i) * r + i  # [n, r, r][j, i, i]
                    diag_at.append(at)
                    eye[at] = 1.0
        self._cell_cols = cols
        self._diag_at = torch.tensor(diag_at, dtype=torch.long, device=self.device)
        self._eye = eye.to(self.device)

    def gather_cells(self, cells: int, full: list[tuple[int, int]],
                     diag: list[tuple[int, int]], plain: list[int]) -> torch.Tensor:
        """Decode: [cells, F], each cell's cores in the "full" layout: `full`/`diag` are (cell,
        row) pairs, `plain` the cells of uncompressed adapters (identity); other cells zero."""
        out = torch.zeros(cells, self._eye.shape[0], dtype=self.dtype, device=self.device)

        def idx(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        if full:
            out[idx([c for c, _ in full])] = self.flat["full"][idx([r for _, r in full])]
        if diag:
            cells_d = idx([c for c, _ in diag])
            out[cells_d[:, None], self._diag_at[None, :]] = \
                self.flat["diag"][idx([r for _, r in diag])]
        if plain:
            out[idx(plain)] = self._eye
        return out

    def cell_cores(self, layer: int, group: str, cells: torch.Tensor) -> CellCores | None:
        """The (layer, group) block of `gather_cells`' result: [P, n, r, r]; None if no
        compressed adapter targets the group."""
        start = self._cell_cols.get((layer, group))
        if start is None:
            return None
        n, r = len(_GROUPS[group]), self.rank
        return CellCores(cells[:, start:start + n * r * r].view(cells.shape[0], n, r, r))

    def gather(self, full: list[tuple[int, int]], diag: list[tuple[int, int]]
               ) -> list[dict[str, Cores]]:
        """Per layer and group, the step's cores: `full`/`diag` are (position, row) pairs.
        One index per kind for the whole step; positions sharing a row (the tokens of one
        prefill) share its gathered copy through `of`."""
        per_kind = {}
        for kind, pairs in (("full", full), ("diag", diag)):
            pos = torch.tensor([p for p, _ in pairs], dtype=torch.long, device=self.device)
            uniq: dict[int, int] = {}
            of = [uniq.setdefault(r, len(uniq)) for _, r in pairs]
            rows = torch.tensor(list(uniq), dtype=torch.long, device=self.device)
            got = self.flat[kind][rows] if pairs else None  # [u, F]
            idx = None if len(uniq) == len(pairs) else torch.tensor(
                of, dtype=torch.long, device=self.device)  # [k] position -> gathered row
            per_kind[kind] = (pos, got, idx)
        empty = torch.zeros(0, dtype=self.dtype, device=self.device)
        out = []
        for layer in range(self.shape.num_layers):
            per = {}
            for group in self.groups:
                (fp, fg, fi), (dp, dg, di) = per_kind["full"], per_kind["diag"]
                f = self.view("full", layer, group, fg) if fg is not None else empty
                d = self.view("diag", layer, group, dg) if dg is not None else empty
                per[group] = Cores(fp, f, dp, d, fi, di)
            out.append(per)
        return out
