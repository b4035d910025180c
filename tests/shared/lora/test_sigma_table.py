"""The Σ table: cores survive growth (more rows, a larger rank, new projection groups), removal
zeroes a row at once and reuses it, and one gather per step gives every layer and group the
cores of its positions (positions of one sequence sharing a row)."""

from __future__ import annotations

import torch

from pice.kernels.lora import Cores, apply_cores_
from pice.shared.lora.adapter import ModelShape
from pice.shared.lora.compress.sigma import SigmaTable

SHAPE = ModelShape("Qwen2ForCausalLM", 3, {
    "q_proj": (8, 8), "k_proj": (8, 4), "v_proj": (8, 4), "o_proj": (8, 8),
    "gate_proj": (8, 16), "up_proj": (8, 16), "down_proj": (16, 8)}, 8)


def _cores(seed: int, rank: int, projs: tuple[str, ...], diag: bool = False
           ) -> dict[tuple[int, str], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (rank,) if diag else (rank, rank)
    return {(layer, p): torch.randn(shape, generator=g) for layer in range(3) for p in projs}


def _check(table: SigmaTable, name: str, cores: dict[tuple[int, str], torch.Tensor]) -> None:
    kind, row = table.rows[name]
    groups = {"q_proj": ("qkv", 0), "k_proj": ("qkv", 1), "v_proj": ("qkv", 2),
              "o_proj": ("o", 0), "down_proj": ("down", 0), "gate_proj": ("gate_up", 0),
              "up_proj": ("gate_up", 1)}
    for (layer, proj), core in cores.items():
        group, j = groups[proj]
        got = table.tables[kind][layer][group][row, j]
        r = core.shape[0]
        assert torch.equal(got[(slice(0, r),) * core.dim()], core), (name, layer, proj)
        assert got.abs().sum() == core.abs().sum()  # zero beyond the adapter's rank


def test_growth_keeps_cores_and_removal_zeroes_at_once() -> None:
    table = SigmaTable(SHAPE, torch.float32, torch.device("cpu"))
    added = {}
    for i in range(20):  # past the first capacity (16 rows)
        added[f"a{i}"] = _cores(i, 2, ("q_proj", "v_proj"))
        table.add(f"a{i}", "full", 2, added[f"a{i}"])
    added["big"] = _cores(99, 4, ("o_proj", "down_proj"))  # larger rank, new groups
    table.add("big", "full", 4, added["big"])
    added["d"] = _cores(7, 3, ("q_proj",), diag=True)
    table.add("d", "diag", 3, added["d"])
    assert table.rank == 4 and table.groups == {"qkv", "o", "down"}
    for name, cores in added.items():
        _check(table, name, cores)
    kind, row = table.rows["a3"]
    table.remove("a3")
    assert table.flat[kind][row].abs().sum() == 0 and "a3" not in table.rows
    table.add("new", "full", 2, _cores(5, 2, ("k_proj",)))
    assert table.rows["new"] == (kind, row)  # the freed row is reused
    assert table.nbytes == sum(t.nbytes for t in table.flat.values())


def test_one_gather_gives_every_layer_its_cores() -> None:
    table = SigmaTable(SHAPE, torch.float32, torch.device("cpu"))
    a, b = _cores(1, 3, ("q_proj", "k_proj", "v_proj", "o_proj")), _cores(2, 3, ("q_proj",))
    d = _cores(3, 3, ("v_proj",), diag=True)
    table.add("a", "full", 3, a)
    table.add("b", "full", 3, b)
    table.add("d", "diag", 3, d)
    ra, rb, rd = (table.rows[x][1] for x in "abd")
    # positions 0-2: a prefill of "a"; 4: "b"; 5-6: "d" (diag); 3: a plain or base row
    got = table.gather([(0, ra), (1, ra), (2, ra), (4, rb)], [(5, rd), (6, rd)])
    assert len(got) == 3 and set(got[0]) == {"qkv", "o"}
    t = torch.randn(7, 4, 3)  # [positions, R, n]
    want = t.clone()
    for pos, cores in ((0, a), (1, a), (2, a), (4, b)):
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            if (1, proj) in cores:
                want[pos, :3, j] = cores[(1, proj)] @ t[pos, :3, j]
            else:
                want[pos, :3, j] = 0  # a compressed adapter without that projection
    for pos in (5, 6):
        want[pos, :3, 2] = d[(1, "v_proj")] * t[pos, :3, 2]
        want[pos, :3, :2] = 0
    c: Cores = got[1]["qkv"]
    assert c.full_of is not None and c.full.shape[0] == 2  # two distinct rows gathered
    apply_cores_(t, c)
    torch.testing.assert_close(t, want)


def test_cell_gather_gives_each_cell_its_core() -> None:
    """Decode: every grid cell gets an r x r core per sub-projection: a full Σ, a diag σ on
    the diagonal, the identity for a plain adapter's cell, zero for an empty one."""
    table = SigmaTable(SHAPE, torch.float32, torch.device("cpu"))
    a, d = _cores(1, 3, ("q_proj", "v_proj", "o_proj")), _cores(3, 2, ("k_proj",), diag=True)
    table.add("a", "full", 3, a)
    table.add("d", "diag", 2, d)
    (_, ra), (_, rd) = table.rows["a"], table.rows["d"]
    cells = table.gather_cells(5, [(0, ra), (3, ra)], [(1, rd)], [4])
    eye = torch.eye(3)
    for layer in range(3):
        qkv = table.cell_cores(layer, "qkv", cells)
        o = table.cell_cores(layer, "o", cells)
        assert qkv is not None and o is not None and table.cell_cores(layer, "down", cells) is None
        for cell in (0, 3):
            torch.testing.assert_close(qkv.core[cell, 0], a[(layer, "q_proj")])
            assert qkv.core[cell, 1].abs().sum() == 0  # "a" does not target k_proj
            torch.testing.assert_close(qkv.core[cell, 2], a[(layer, "v_proj")])
            torch.testing.assert_close(o.core[cell, 0], a[(layer, "o_proj")])
        want_k = torch.zeros(3, 3)
        want_k[:2, :2] = torch.diag(d[(layer, "k_proj")])
        torch.testing.assert_close(qkv.core[1, 1], want_k)
        assert qkv.core[1, 0].abs().sum() == 0 and o.core[1].abs().sum() == 0
        assert qkv.core[2].abs().sum() == 0 and o.core[2].abs().sum() == 0  # an empty cell
        for j in range(3):
            torch.testing.assert_close(qkv.core[4, j], eye)
        torch.testing.assert_close(o.core[4, 0], eye)


def test_prefill_cores_many_tokens_few_rows() -> None:
    """Long prefills (many tokens, few distinct cores) take the one-GEMM path: same result."""
    g = torch.Generator().manual_seed(4)
    full = torch.randn(3, 2, 4, 4, generator=g)  # 3 distinct cores, n = 2
    of = torch.tensor([0] * 10 + [2] * 7 + [1] * 9)
    pos = torch.arange(26) + 2
    t = torch.randn(30, 5, 2, generator=g)  # R = 5 > r = 4: the extra rank row untouched
    want = t.clone()
    for p, row in zip(pos.tolist(), of.tolist(), strict=True):
        for j in range(2):
            want[p, :4, j] = full[row, j] @ t[p, :4, j]
    apply_cores_(t, Cores(pos, full, pos[:0], torch.zeros(0), of, None))
    torch.testing.assert_close(t, want)
