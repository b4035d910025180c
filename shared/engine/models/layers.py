"""Building blocks shared by the architectures: norms, the fused gated MLP, paged attention.

Every projection is a plain nn.Linear (swapped for QuantLinear / SkinnyLinear on load); q/k/v
and gate/up are fused into one matmul each, the checkpoint's separate weights being copied into
row slices at load time (see `fused_sizes` and the loader)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pice.kernels.paged_attention import AttentionMetadata, paged_attention
from pice.kernels.rowwise import gated_activation
from pice.shared.engine.models.rope import apply_rotary
from pice.shared.errors import UnsupportedModelError

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class LoraHook(Protocol):
    """Adds a batch's LoRA terms to a projection's output in place (pice.shared.engine.lora)."""

    def apply(self, group: str, y: torch.Tensor, x: torch.Tensor) -> None: ...


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"unsupported activation {name!r}; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class RMSNorm(nn.Module):
    """Llama/Qwen RMSNorm: normalize in float32, cast back, then scale by the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma RMSNorm: the weight is stored zero-centred and applied as (1 + w), in float32, and
    only the product is cast back (unlike Llama, which casts before scaling)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., dim]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).type_as(x)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up as one matmul."""

    fused_sizes: dict[str, list[int]]

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act, self.act_name = activation(act), act
        self.fused_sizes = {"gate_up_proj": [intermediate, intermediate]}
        self.lora: LoraHook | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, hidden] -> gate_up: [num_tokens, 2 * intermediate]
        gate_up = self.gate_up_proj(x)
        if self.lora is not None:
            self.lora.apply("gate_up", gate_up, x)
        h = gated_activation(gate_up, self.act_name)  # row by row: batch-invariant
        if h is None:
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.act(gate) * up  # [num_tokens, intermediate]
        out = self.down_proj(h)  # [num_tokens, hidden]
        if self.lora is not None:
            self.lora.apply("down", out, h)
        return out


class Attention(nn.Module):
    """Grouped-query self-attention over the paged KV cache, optionally with per-head q/k norms
    (Gemma 3) applied before the rotary embedding."""

    fused_sizes: dict[str, list[int]]

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, sliding_window: int | None, qkv_bias: bool, o_bias: bool,
                 qk_norm_eps: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.sliding_window = scale, sliding_window
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden, q_size + 2 * kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, hidden, bias=o_bias)
        self.fused_sizes = {"qkv_proj": [q_size, kv_size, kv_size]}
        self.lora: LoraHook | None = None
        self.q_norm: GemmaRMSNorm | None = None
        self.k_norm: GemmaRMSNorm | None = None
        if qk_norm_eps is not None:
            self.q_norm = GemmaRMSNorm(head_dim, qk_norm_eps)
            self.k_norm = GemmaRMSNorm(head_dim, qk_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        # x: [num_tokens, hidden]; cos, sin: [num_tokens, head_dim // 2]
        n, heads, kv_heads, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [num_tokens, (heads + 2 * kv_heads) * head_dim]
        if self.lora is not None:
            self.lora.apply("qkv", qkv, x)
        v = qkv[:, (heads + kv_heads) * hd:].view(n, kv_heads, hd)  # [num_tokens, kv_heads, hd]
        qk = qkv[:, :(heads + kv_heads) * hd].view(n, heads + kv_heads, hd)
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat((self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])), dim=1)
        # Rotate q and k heads in one go: [num_tokens, heads + kv_heads, head_dim]
        q, k = apply_rotary(qk, cos, sin).split((heads, kv_heads), dim=1)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale,
                              self.sliding_window)  # [num_tokens, heads, head_dim]
        flat = out.reshape(n, -1)  # [num_tokens, heads * head_dim]
        o = self.o_proj(flat)  # [num_tokens, hidden]
        if self.lora is not None:
            self.lora.apply("o", o, flat)
        return o
