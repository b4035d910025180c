"""Build an engine model whose projections, embedding and LM head are quantized (QuantLinear /
QuantEmbedding over GGUF-format blocks), from a `WeightSource`: a GGUF file's own tensors, kept
as they are (gguf_source.py), or a safetensors checkpoint quantized to int8 (Q8_0) or int4
(Q4_K, or Q4_0 where a row is not a multiple of 256) one tensor at a time. The model keeps its
structure (embed_tokens, layers, norm, lm_head), so LoRA hooks and layer ranges work as on
fp32; only norms and biases stay float."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, cast

import torch
from torch import nn

from pice.kernels.quant import Fmt, dequantize, quantize, row_bytes
from pice.kernels.quant_linear import QuantEmbedding, QuantLinear, QuantWeight
from pice.shared.engine.models.base import CausalLM
from pice.shared.engine.models.safetensors_file import SafetensorsFile
from pice.shared.errors import UnsupportedModelError


class DenseSource(Protocol):
    """Checkpoint tensors by their Hugging Face name."""

    def has(self, name: str) -> bool: ...

    def dense(self, name: str) -> torch.Tensor:
        """A float tensor (norm weights, biases)."""
        ...


class WeightSource(DenseSource, Protocol):
    def quantized(self, name: str) -> QuantWeight:
        """A matrix [rows, k] as quantized blocks (its own format, or quantized now)."""
        ...


class SafetensorsSource:
    """Float tensors of a safetensors checkpoint, read one at a time with plain reads."""

    def __init__(self, files: list[Path]) -> None:
        self.where: dict[str, SafetensorsFile] = {}
        for file in files:
            f = SafetensorsFile(file)
            self.where.update((name, f) for name in f.names())

    def has(self, name: str) -> bool:
        return name in self.where

    def dense(self, name: str) -> torch.Tensor:
        return self.where[name].read(name)


class Requantized:
    """Another source's matrices quantized now: `int8` -> Q8_0 (one scale per 32 values),
    `int4` -> Q4_K (Q4_0 for rows that are not a multiple of 256)."""

    def __init__(self, inner: DenseSource, bits: int) -> None:
        self.inner, self.bits = inner, bits

    def has(self, name: str) -> bool:
        return self.inner.has(name)

    def dense(self, name: str) -> torch.Tensor:
        return self.inner.dense(name)

    def _format(self, name: str, k: int) -> Fmt:
        if k % 32:
            raise UnsupportedModelError(f"{name}: row length {k} is not a multiple of 32")
        return Fmt.Q8_0 if self.bits == 8 else Fmt.Q4_K if k % 256 == 0 else Fmt.Q4_0

    def quantized(self, name: str) -> QuantWeight:
        own = getattr(self.inner, "quantized", None)
        if own is not None:  # a GGUF's blocks: requantized a piece of rows at a time, so no
            src: QuantWeight = own(name)  # whole float32 matrix is ever held
            fmt = self._format(name, src.k)
            if src.fmt == fmt:
                return src
            out = torch.empty(src.rows, row_bytes(fmt, src.k), dtype=torch.uint8)
            step = max(1, (1 << 22) // src.k)
            for r0 in range(0, src.rows, step):
                piece = dequantize(src.data[r0:r0 + step], src.fmt, src.k)
                out[r0:r0 + step] = quantize(piece, fmt)
            return QuantWeight(out, fmt, src.k)
        w = self.inner.dense(name).float()  # [rows, k], one tensor at a time
        fmt = self._format(name, w.shape[1])
        return QuantWeight(quantize(w, fmt), fmt, w.shape[1])


def _parts(model: CausalLM, leaf: str) -> list[str]:
    """Checkpoint leaf names that make up our projection `leaf` (q/k/v for qkv_proj...)."""
    shards = sorted((shard, name) for name, (fused, shard) in model.fused_weights.items()
                    if fused == leaf)
    return [name for _, name in shards] or [leaf]


@torch.no_grad()
def build_quantized(model: CausalLM, source: WeightSource) -> CausalLM:
    """Fill a model built on the meta device: every nn.Linear becomes a QuantLinear over the
    source's matrices, the embedding a QuantEmbedding, the rest float. Refuses a checkpoint
    that leaves a tensor unfilled."""
    linears = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and name != "lm_head"]
    biases: dict[str, torch.Tensor] = {}  # set after to_empty, which would wipe them
    for name, mod in linears:
        owner_name, leaf = name.rsplit(".", 1)
        prefix = f"{owner_name}."
        parts = _parts(model, leaf)
        missing = [p for p in parts if not source.has(f"{prefix}{p}.weight")]
        if missing:
            raise UnsupportedModelError(f"weights missing from checkpoint: {prefix}{missing[0]}")
        segments = [source.quantized(f"{prefix}{p}.weight") for p in parts]
        quant = QuantLinear(segments, None)
        if mod.bias is not None:
            biases[name] = torch.cat([source.dense(f"{prefix}{p}.bias").float() for p in parts])
        if (quant.out_features, quant.in_features) != (mod.out_features, mod.in_features):
            raise UnsupportedModelError(
                f"{name}: checkpoint shape {(quant.out_features, quant.in_features)}, expected "
                f"{(mod.out_features, mod.in_features)}")
        model.get_submodule(owner_name).register_module(leaf, quant)
    embed = QuantEmbedding(source.quantized("model.embed_tokens.weight"))
    model.model.register_module("embed_tokens", embed)
    # a GGUF's own output tensor is used even for tied models, as llama.cpp does
    own_head = source.has("lm_head.weight") and (
        not model.tie_word_embeddings or getattr(source, "separate_head", False))
    if not own_head:
        model.lm_head = embed.as_linear()  # type: ignore[assignment]
    else:
        model.lm_head = QuantLinear([source.quantized("lm_head.weight")])  # type: ignore[assignment]
    # what is left (norms, biases of the meta model) is float: materialize and fill
    model.to_empty(device="cpu")
    for name, bias in biases.items():
        cast(QuantLinear, model.get_submodule(name)).set_bias(bias)
    for name, param in model.named_parameters():
        if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), QuantLinear):
            continue  # a bias, set above
        if not source.has(name):
            raise UnsupportedModelError(f"weights missing from checkpoint: {name}")
        tensor = source.dense(name)
        if tensor.shape != param.shape:
            raise UnsupportedModelError(f"weight {name} has shape {tuple(tensor.shape)}, "
                                        f"expected {tuple(param.shape)}")
        param.copy_(tensor)
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the quantized weights of `model` (a tied head counted once)."""
    seen: set[int] = set()
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear | QuantEmbedding):
            segs = mod.segments if isinstance(mod, QuantLinear) else [mod.qweight]
            for s in segs:
                if id(s.data) not in seen:
                    seen.add(id(s.data))
                    total += s.data.numel()
    return total


@torch.no_grad()
def densify(model: CausalLM, dtype: torch.dtype) -> CausalLM:
    """Every QuantLinear / QuantEmbedding of `model` back to a plain float layer of `dtype`
    (the fp32 / bf16 engine on a GGUF-only model directory)."""
    embed = model.model.get_submodule("embed_tokens")
    if isinstance(embed, QuantEmbedding):
        dense = nn.Embedding(embed.num_embeddings, embed.embedding_dim, dtype=dtype,
                             device="meta").to_empty(device="cpu")
        _dequantize_into(dense.weight, [embed.qweight])
        model.model.register_module("embed_tokens", dense)
        del embed, dense
    # by name, so each QuantLinear is freed as soon as its float layer replaces it
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        mod = cast(QuantLinear, model.get_submodule(name))
        owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                        dtype=dtype, device="meta").to_empty(device="cpu")
        if name == "lm_head" and model.tie_word_embeddings:
            lin.weight = cast(nn.Embedding, model.model.get_submodule("embed_tokens")).weight
        else:
            _dequantize_into(lin.weight, mod.segments)
        if mod.bias is not None:
            assert lin.bias is not None
            lin.bias.copy_(mod.bias)
        model.get_submodule(owner).register_module(leaf, lin)
        del mod, lin
    return cast(CausalLM, model.to(dtype))


def _dequantize_into(dest: torch.Tensor, segments: list[QuantWeight]) -> None:
    """Fill dest [sum rows, k] from quantized segments, a piece of rows at a time (no float32
    copy of a whole matrix besides `dest` itself)."""
    r0 = 0
    for seg in segments:
        step = max(1, (1 << 22) // seg.k)
        for s0 in range(0, seg.rows, step):
            part = QuantWeight(seg.data[s0:s0 + step], seg.fmt, seg.k).dequantize()
            dest[r0 + s0:r0 + s0 + part.shape[0]].copy_(part)
        r0 += seg.rows


def step_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every matrix once (quantized or float), the
    embedding table only where it doubles as the LM head (else one row per token)."""
    seen: set[int] = set()
    total = 0
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    for mod in model.modules():
        tensors: list[torch.Tensor] = list(mod.parameters(recurse=False))  # norms, biases...
        if isinstance(mod, QuantLinear):
            tensors += [s.data for s in mod.segments]
        elif mod is embed and embed is not None:
            tensors = []
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
