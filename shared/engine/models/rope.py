"""Rotary position embeddings: inverse frequencies per rope type, a cos/sin table per theta.

The formulas follow transformers' `modeling_rope_utils` bit for bit (same float32 arithmetic), so
logits match the reference implementation to rounding."""

from __future__ import annotations

import math
from typing import Any

import torch

from pice.shared.errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def inv_freq_of(params: dict[str, Any], head_dim: int, max_positions: int) -> torch.Tensor:
    """[head_dim // 2] float32 inverse frequencies for one layer type's rope parameters."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported")
    base = float(params["rope_theta"])
    # Explicit CPU device: the model may be constructed under torch.device("meta").
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (base ** exps)
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        return _llama3(inv_freq, params, max_positions)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, params: dict[str, Any], max_positions: int) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept, the band between
    interpolated smoothly (transformers `_compute_llama3_parameters`)."""
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_ctx = float(params.get("original_max_position_embeddings") or max_positions)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryCache:
    """cos/sin of position * inv_freq for positions [0, n), built lazily on the device and dtype
    of use and grown by doubling, so a step only gathers rows: no trig per layer or per token.

    Not an nn.Module on purpose: it is derived state (never in a checkpoint) and follows the
    device of the positions it is asked for."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq  # [head_dim // 2] float32, CPU
        self.cos: torch.Tensor | None = None  # [n, head_dim // 2]
        self.sin: torch.Tensor | None = None

    def _build(self, n: int, device: torch.device, dtype: torch.dtype) -> None:
        pos = torch.arange(n, dtype=torch.int64, device=device).float()
        # Outer product as an elementwise float32 multiply, as transformers does; cos/sin are
        # then cast to the activation dtype (also as transformers does).
        freqs = pos[:, None] * self.inv_freq.to(device)[None, :]  # [n, head_dim // 2]
        self.cos, self.sin = freqs.cos().to(dtype), freqs.sin().to(dtype)

    def lookup(self, positions: torch.Tensor, max_len: int,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens] int64, all < max_len -> cos, sin: [num_tokens, head_dim // 2]."""
        cos = self.cos
        if (cos is None or cos.shape[0] < max_len or cos.device != positions.device
                or cos.dtype != dtype):
            size = max(256, 1 << max(0, max_len - 1).bit_length())
            if cos is not None and cos.device == positions.device and cos.dtype == dtype:
                size = max(size, 2 * cos.shape[0])
            self._build(size, positions.device, dtype)
        assert self.cos is not None and self.sin is not None
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim]; cos, sin: [num_tokens, head_dim // 2].

    The "rotate half" layout of HF checkpoints: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s); equal
    bit for bit to transformers' x * cos + rotate_half(x) * sin."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
