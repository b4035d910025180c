"""Linear layers and embeddings over quantized weights kept as GGUF blocks (see quant.py):
the C++ kernels in csrc/quant_linear.cpp + csrc/quant/*, compiled on first use and cached,
dispatching at run time to the best SIMD backend of this CPU (AVX2/FMA/F16C on x86-64, NEON
with the dot-product instructions on aarch64; a portable path elsewhere). Where the extension
cannot be built, the torch reference runs instead (weights dequantised one layer at a time per
call: slow, still correct, and logged once)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pice.kernels.quant import Fmt, dequantize, row_bytes

log = logging.getLogger(__name__)

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / "quant_linear.cpp", *(_CSRC / "quant" / f"{n}.cpp"
                                          for n in ("portable", "avx2", "neon"))]


@functools.cache
def load_quant_kernel() -> Any | None:
    """The compiled extension, or None where it cannot be built here."""
    flags = ["-O3", "-fopenmp"]  # SIMD code is enabled per file by target pragmas
    try:
        from pice.kernels.build import load_extension

        return load_extension("pice_quant_linear", sources=[str(s) for s in _SOURCES],
                              extra_cflags=flags, extra_ldflags=["-fopenmp"],
                              extra_include_paths=[str(_CSRC)], verbose=False)
    except Exception as exc:  # no compiler / headers: the torch reference path
        log.warning("quant_linear: could not build the kernels (%s); using the torch reference",
                    exc)
        return None


class QuantWeight:
    """One quantized matrix [rows, k]: uint8 blocks [rows, row_bytes(fmt, k)]."""

    def __init__(self, data: torch.Tensor, fmt: Fmt, k: int) -> None:
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != row_bytes(fmt, k):
            raise ValueError(f"{fmt.name} weight of row length {k} needs uint8 "
                             f"[rows, {row_bytes(fmt, k)}], got {tuple(data.shape)}")
        self.data, self.fmt, self.k = data.contiguous(), Fmt(fmt), k

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, k]."""
        kernel = load_quant_kernel()
        if kernel is None:
            return dequantize(self.data, self.fmt, self.k)
        out: torch.Tensor = kernel.dequantize(self.data, int(self.fmt), self.k)
        return out


class QuantLinear(nn.Module):
    """y = x @ W^T (+ bias) where W is the row-wise concatenation of quantized segments (a fused
    q/k/v or gate/up projection may mix formats, as GGUF files do per tensor). The segments are
    plain tensors, not parameters or buffers: `to_empty` and state_dict leave them alone."""

    def __init__(self, segments: list[QuantWeight], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        k = {s.k for s in segments}
        if len(k) != 1:
            raise ValueError(f"segments of one linear layer must share the row length, got {k}")
        self.segments = segments
        self.in_features = k.pop()
        self.out_features = sum(s.rows for s in segments)
        self.bias: nn.Parameter | None
        self.register_parameter(
            "bias", None if bias is None else nn.Parameter(bias.float(), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features] (float32 math; result in x's dtype)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).float()  # [M, K]
        kernel = load_quant_kernel()
        if kernel is None:
            w = torch.cat([s.dequantize() for s in self.segments])  # [N, K]
            y = flat @ w.T
        else:
            # one path for every row count: a row's result does not depend on the batch
            y = kernel.qlinear(flat, [s.data for s in self.segments],
                               [int(s.fmt) for s in self.segments])
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def set_bias(self, bias: torch.Tensor) -> None:
        self.bias = nn.Parameter(bias.float().reshape(self.out_features), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out_features, in_features] (tests, and peft's dequantised base)."""
        return torch.cat([s.dequantize() for s in self.segments])

    def nbytes(self) -> int:
        return sum(s.data.numel() for s in self.segments)

    def extra_repr(self) -> str:
        fmts = "+".join(s.fmt.name for s in self.segments)
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={fmts}"


class QuantEmbedding(nn.Module):
    """Embedding lookup over a quantized [vocab, dim] matrix: only the looked-up rows are
    dequantised. `as_linear()` shares the same bytes as a tied LM head."""

    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        self.qweight = weight
        self.num_embeddings, self.embedding_dim = weight.rows, weight.k

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [num_tokens] -> [num_tokens, dim] float32
        kernel = load_quant_kernel()
        w = self.qweight
        if kernel is None:
            return dequantize(w.data[ids.reshape(-1)], w.fmt, w.k).reshape(*ids.shape, w.k)
        out: torch.Tensor = kernel.embedding(w.data, int(w.fmt), w.k, ids.reshape(-1))
        return out.reshape(*ids.shape, w.k)

    def as_linear(self) -> QuantLinear:
        return QuantLinear([self.qweight])

    def nbytes(self) -> int:
        return int(self.qweight.data.numel())
