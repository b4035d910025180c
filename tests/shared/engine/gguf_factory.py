"""Tiny GGUF files for tests: a Hugging Face model's tensors written with the `gguf` package's
writer under llama.cpp's names (with llama.cpp's own changes: Llama q/k rows permuted, Gemma
norms stored as 1 + w), each matrix quantized to the format asked for. Also the dequantised fp32
reference: the same HF model with every matrix replaced by what the GGUF holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from pice.kernels.quant import Fmt, dequantize, quantize

LEAF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
GEMMA = {"post_attention_layernorm": "post_attention_norm",
         "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def gguf_name(name: str, arch: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
           "model.norm.weight": "output_norm.weight"}
    if name in top:
        return top[name]
    _, _, i, rest = name.split(".", 3)
    leaf, kind = rest.rsplit(".", 1)
    table = {**LEAF, **(GEMMA if arch == "gemma3" else {"post_attention_layernorm": "ffn_norm"})}
    return f"blk.{i}.{table[leaf]}.{kind}"


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py `permute`)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_gguf(model: torch.nn.Module, path: Path, arch: str,
               formats: dict[str, Fmt] | Fmt) -> dict[str, torch.Tensor]:
    """Write `model`'s weights into `path`; matrices in `formats` (by leaf, e.g. "down_proj",
    "embed_tokens", "lm_head"; or one format for all). Returns the dequantised state dict (HF
    names) that the fp32 reference must load."""
    cfg = model.config
    writer = GGUFWriter(str(path), arch)
    ref: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.detach().float()
        if w.dim() == 2:
            leaf = name.split(".")[-2]
            fmt = formats if isinstance(formats, Fmt) else formats.get(leaf, Fmt.Q8_0)
            q = quantize(w, fmt)
            ref[name] = dequantize(q, fmt, w.shape[1])
            stored = q
            if arch == "llama" and leaf in ("q_proj", "k_proj"):
                heads = cfg.num_attention_heads if leaf == "q_proj" else cfg.num_key_value_heads
                stored = _permute(q, heads)
            writer.add_tensor(gguf_name(name, arch), stored.numpy(),
                              raw_dtype=GGMLQuantizationType(int(fmt)))
        else:
            ref[name] = w
            if arch == "gemma3" and name.endswith("norm.weight"):
                w = w + 1.0
            writer.add_tensor(gguf_name(name, arch), w.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return ref


def dequantized_reference(model: torch.nn.Module, ref: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`model` with its weights replaced by the GGUF's dequantised values."""
    model.load_state_dict(ref, strict=False)
    return model.eval()
