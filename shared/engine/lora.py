"""LoRA inside the engine's model: per-layer hooks that add the batch's low-rank terms after each
projection (whatever kernel the projection uses: fp32, SkinnyLinear, int8), and the per-step
batch layout the model runner sets before a forward pass."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from pice.kernels.lora import Cores, DecodeLayout, Segment, bgmv_, sgmv_
from pice.shared.engine.models.base import CausalLM
from pice.shared.engine.models.layers import Attention, GatedMLP
from pice.shared.engine.sequence import Sequence
from pice.shared.lora.adapter import ModelShape
from pice.shared.lora.slots import SlotBuffers


@dataclass
class LoraBatch:
    """Which slot each token of a step uses: a per-token index for decode (BGMV), contiguous
    row segments for prefill (SGMV; the runner orders the batch by slot)."""

    decode: DecodeLayout | None = None  # from the per-token slot index (decode)
    segments: list[Segment] = field(default_factory=list)  # (prefill)
    groups: frozenset[str] = frozenset()  # projection groups any adapter of the step targets
    cores: list[dict[str, Cores]] | None = None  # [layer][group]: compressed adapters' cores
    cells: torch.Tensor | None = None  # decode: [P, F] every grid cell's cores (SigmaTable)


class LoraState:
    """Shared by every hook of one model: the slot buffers and the current step's layout."""

    def __init__(self) -> None:
        self.buffers: SlotBuffers | None = None
        self.batch: LoraBatch | None = None

    def layout(self, seqs: Seq[Sequence], query_lens: Seq[int], is_prefill: bool,
               device: torch.device) -> LoraBatch | None:
        """The step's layout (`lora_batch`), with each segment at the rank its slot holds and
        the per-token cores of compressed adapters (whose slot is their cluster's basis)."""
        batch = lora_batch(seqs, query_lens, is_prefill, device)
        buffers = self.buffers
        if batch is None or buffers is None:
            return batch
        if is_prefill:
            batch.segments = [Segment(g.start, g.end, g.slot, buffers.slot_rank[g.slot] or g.rank)
                              for g in batch.segments]
        table = buffers.sigma
        if not table.rows:
            return batch
        full: list[tuple[int, int]] = []
        diag: list[tuple[int, int]] = []
        plain: list[int] = []  # decode: cells of uncompressed adapters (an identity core)
        grid = batch.decode
        # seen[slot]: decode tokens of that slot so far (the order DecodeLayout numbers them)
        start, seen = 0, dict[int, int]()
        for seq, q in zip(seqs, query_lens, strict=True):
            start += q
            slot = seq.lora_slot
            if slot is None:
                continue
            pos = seen.get(slot, 0)
            seen[slot] = pos + 1
            got = table.rows.get(seq.adapter) if seq.adapter is not None else None
            if grid is not None:  # decode: the cell of the sequence's token in the grid
                cell = (slot - grid.lo) * grid.per_slot + pos
                if got is None:
                    plain.append(cell)
                else:
                    (full if got[0] == "full" else diag).append((cell, got[1]))
            elif got is not None:
                kind, row = got
                (full if kind == "full" else diag).extend(
                    (p, row) for p in range(start - q, start))
        if not (full or diag):
            return batch
        if grid is not None:
            batch.cells = table.gather_cells(grid.span * grid.per_slot, full, diag, plain)
        else:
            batch.cores = table.gather(full, diag)
        return batch


class LayerLora:
    """The hook one decoder layer's attention and MLP call after each projection."""

    def __init__(self, state: LoraState, layer: int) -> None:
        self.state, self.layer = state, layer

    def apply(self, group: str, y: torch.Tensor, x: torch.Tensor) -> None:
        """y: [num_tokens, out] (the base projection's output, updated in place); x: its input
        [num_tokens, in]."""
        batch, buffers = self.state.batch, self.state.buffers
        if batch is None or buffers is None or group not in batch.groups:
            return
        a, bs = buffers.group(self.layer, group)
        if batch.decode is not None:  # decode: a core per grid cell
            cells = None if batch.cells is None else \
                buffers.sigma.cell_cores(self.layer, group, batch.cells)
            bgmv_(y, x, a, bs, batch.decode, cells)
        else:  # prefill: cores at the rows of compressed adapters
            cores = batch.cores[self.layer].get(group) if batch.cores is not None else None
            sgmv_(y, x, a, bs, batch.segments, cores)


def model_shape(model: CausalLM) -> ModelShape:
    """The projection sizes adapters must match, read off the engine's model."""
    layers = cast(nn.ModuleList, model.model.get_submodule("layers"))
    attn = cast(Attention, layers[0].get_submodule("self_attn"))
    mlp = cast(GatedMLP, layers[0].get_submodule("mlp"))
    q, kv, _ = attn.fused_sizes["qkv_proj"]
    inter = mlp.fused_sizes["gate_up_proj"][0]
    hidden = cast(nn.Embedding, model.model.get_submodule("embed_tokens")).embedding_dim
    dims = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}
    return ModelShape(type(model).__name__, model.num_layers, dims, hidden)


def attach_lora(model: CausalLM) -> LoraState:
    """Give every layer's attention and MLP a hook sharing one state (inert until the runner
    sets a batch)."""
    state = LoraState()
    for i, layer in enumerate(cast(nn.ModuleList, model.model.get_submodule("layers"))):
        hook = LayerLora(state, i)
        cast(Attention, layer.get_submodule("self_attn")).lora = hook
        cast(GatedMLP, layer.get_submodule("mlp")).lora = hook
    return state


def lora_batch(seqs: Seq[Sequence], query_lens: Seq[int], is_prefill: bool,
               device: torch.device) -> LoraBatch | None:
    """The step's layout; None when no sequence uses an adapter. Prefill expects `seqs`
    ordered by slot (so each adapter's tokens are contiguous)."""
    slots = [-1 if s.lora_slot is None else s.lora_slot for s in seqs]
    if all(s < 0 for s in slots):
        return None
    groups = frozenset().union(*(s.lora_groups for s in seqs))
    if not is_prefill:
        return LoraBatch(decode=DecodeLayout.build(slots, device), groups=groups)
    segments: list[Segment] = []
    start = 0
    for seq, slot, q in zip(seqs, slots, query_lens, strict=True):
        if slot >= 0:
            last = segments[-1] if segments else None
            if last is not None and last.slot == slot and last.end == start:
                segments[-1] = Segment(last.start, start + q, slot, last.rank)
            else:
                segments.append(Segment(start, start + q, slot, seq.lora_rank))
        start += q
    return LoraBatch(segments=segments, groups=groups)
