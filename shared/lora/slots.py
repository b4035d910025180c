"""Device slot buffers: every resident adapter's A and B matrices, zero-padded to the maximum
rank, in buffers allocated once (a swap is a copy into a slot, never an allocation).

Layout per layer and fused group (see pice.kernels.lora): a: [S, R, n, in] and bs[j]:
[S, out_j, R] for the group's sub-projections j (q/k/v share one input, so do gate/up).

A compressed adapter's slot is its cluster's basis; its cores live in the `SigmaTable` (every
compressed adapter's Σ_i, always on the device: a few hundred bytes per module)."""

from __future__ import annotations

import torch

from pice.kernels.quant_memory import zeros_lazy
from pice.shared.lora.adapter import LoadedAdapter, ModelShape
from pice.shared.lora.compress.sigma import SigmaTable

# Fused groups of the engine's projections, in their output column order.
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
GROUP_OF: dict[str, tuple[str, int]] = {p: (g, j) for g, ps in GROUPS.items()
                                         for j, p in enumerate(ps)}


def slot_bytes(shape: ModelShape, max_rank: int, itemsize: int) -> int:
    """Bytes one slot takes across all layers."""
    per_layer = sum(max_rank * (fan_in + fan_out) for fan_in, fan_out in shape.dims.values())
    return per_layer * shape.num_layers * itemsize


class SlotBuffers:
    def __init__(self, shape: ModelShape, num_slots: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_slots, self.max_rank = num_slots, max_rank
        self.slot_rank = [0] * num_slots  # the rank of what each slot holds (prefill reads it)
        self.sigma = SigmaTable(shape, dtype, device)
        self.a: list[dict[str, torch.Tensor]] = []  # [layer][group]: [S, R, n, in]
        self.b: list[dict[str, list[torch.Tensor]]] = []  # [layer][group][j]: [S, out_j, R]
        for _ in range(shape.num_layers):
            a_layer, b_layer = {}, {}
            for group, projs in GROUPS.items():
                fan_in = shape.dims[projs[0]][0]
                # lazily committed on the CPU: slots cost memory as adapters fill them
                a_layer[group] = zeros_lazy((num_slots, max_rank, len(projs), fan_in), dtype,
                                            device)
                b_layer[group] = [zeros_lazy((num_slots, shape.dims[p][1], max_rank), dtype,
                                             device) for p in projs]
            self.a.append(a_layer)
            self.b.append(b_layer)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.a for t in layer.values()) + \
            sum(t.nbytes for layer in self.b for ts in layer.values() for t in ts)

    def group(self, layer: int, group: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.a[layer][group], self.b[layer][group]

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        # only the rank written before is non-zero: zeroing just that leaves the rest of a
        # lazily committed buffer untouched (no memory for a slot never filled)
        r, self.slot_rank[slot] = self.slot_rank[slot], 0
        if r == 0:
            return
        for a_layer, b_layer in zip(self.a, self.b, strict=True):
            for group, a in a_layer.items():
                a[slot, :r].zero_()
                for b in b_layer[group]:
                    b[slot, :, :r].zero_()

    @torch.no_grad()
    def write(self, slot: int, adapter: LoadedAdapter) -> None:
        """Copy an adapter into a slot; projections it does not target stay zero."""
        self.clear(slot)
        self.slot_rank[slot] = max((a.shape[0] for a, _ in adapter.weights.values()), default=0)
        for (layer, proj), (a, b) in adapter.weights.items():
            group, j = GROUP_OF[proj]
            r = a.shape[0]
            self.a[layer][group][slot, :r, j].copy_(a)  # [r, in]
            self.b[layer][group][j][slot, :, :r].copy_(b)  # [out, r]
