"""A GGUF file's tensors under Hugging Face names, for `build_quantized`: quantized matrices
are read as they are (one copy into memory, never dequantised), float tensors as float32.

llama.cpp's converter changes a few tensors, undone here: Llama's q/k rows are permuted for its
rotary layout (a row permutation, exact on quantized rows too) and Gemma's norm weights are
stored as 1 + w."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pice.kernels.quant import BLOCKS, Fmt, dequantize, row_bytes
from pice.kernels.quant_linear import QuantWeight
from pice.shared.engine.models.gguf_file import read_header
from pice.shared.errors import UnsupportedModelError

_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}
# post_attention_layernorm is the FFN's pre-norm in Llama/Qwen2 (llama.cpp: ffn_norm); Gemma 3
# has four norms per layer
_LAYER_BY_ARCH = {
    "gemma3": {"post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
}
_DEFAULT_LAYER = {"post_attention_layernorm": "ffn_norm"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
           "model.norm.weight": "output_norm.weight"}
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class GGUFSource:
    separate_head = True  # llama.cpp stores (and uses) output.weight even for tied models

    def __init__(self, path: Path, config: Any) -> None:
        self.path = Path(path)
        header = read_header(self.path)  # tensor bytes are read on demand
        self.arch = header.architecture
        # name -> (format, shape [rows, k] in torch order, absolute file offset, bytes)
        self.tensors: dict[str, tuple[Fmt, tuple[int, ...], int, int]] = {}
        for t in header.tensors.values():
            try:
                fmt = Fmt(t.ggml_type)
            except ValueError:
                raise UnsupportedModelError(
                    f"GGUF tensor {t.name} has ggml type {t.ggml_type}; supported: "
                    f"{', '.join(f.name for f in BLOCKS)}") from None
            rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
            self.tensors[t.name] = (fmt, t.shape, t.offset, rows * row_bytes(fmt, t.shape[-1]))
        self.layer_map = {**_LAYER, **_LAYER_BY_ARCH.get(self.arch, _DEFAULT_LAYER)}
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)

    def _gguf_name(self, name: str) -> str | None:
        if name in _GLOBAL:
            return _GLOBAL[name]
        m = _LAYER_NAME.match(name)
        if m is None or m.group(2) not in self.layer_map:
            return None
        return f"blk.{m.group(1)}.{self.layer_map[m.group(2)]}.{m.group(3)}"

    def has(self, name: str) -> bool:
        gname = self._gguf_name(name)
        return gname is not None and gname in self.tensors

    def _read(self, gname: str) -> tuple[torch.Tensor, Fmt, tuple[int, ...]]:
        fmt, shape, offset, nbytes = self.tensors[gname]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        data = torch.empty(rows, nbytes // rows, dtype=torch.uint8)
        with open(self.path, "rb") as f:  # plain reads: no mapped file pages in our RSS
            f.seek(offset)
            if f.readinto(data.numpy().data.cast("B")) != nbytes:
                raise UnsupportedModelError(f"GGUF {self.path} is truncated at {gname}")
        return data, fmt, shape

    def _unpermute(self, name: str, rows: int) -> torch.Tensor | None:
        """Row order undoing llama.cpp's q/k permutation (Llama only), or None."""
        if self.arch != "llama" or not re.search(r"\.(q_proj|k_proj)\.", name):
            return None
        heads = self.heads if ".q_proj." in name else self.kv_heads
        half = rows // heads // 2
        # gguf row (h, i, j) with j the pair index came from HF row (h, j, i)
        return torch.arange(rows).view(heads, 2, half).transpose(1, 2).reshape(-1)

    def quantized(self, name: str) -> QuantWeight:
        gname = self._gguf_name(name)
        assert gname is not None
        data, fmt, shape = self._read(gname)
        perm = self._unpermute(name, data.shape[0])
        if perm is not None:
            data = data[torch.argsort(perm)]
        return QuantWeight(data, fmt, shape[-1])

    def dense(self, name: str) -> torch.Tensor:
        gname = self._gguf_name(name)
        assert gname is not None
        data, fmt, shape = self._read(gname)
        out = dequantize(data, fmt, shape[-1]).reshape(shape)
        perm = self._unpermute(name, out.shape[0])
        if perm is not None:
            out = out[torch.argsort(perm)]
        if self.arch == "gemma3" and name.endswith("norm.weight"):
            out = out - 1.0
        return out
