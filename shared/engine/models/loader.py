"""`build_model`: config.json -> architecture class -> weights from *.safetensors or a GGUF.

The model is constructed on the meta device (no memory, no random init), materialized empty on
the target device in the target dtype, then every parameter is filled from the checkpoint
(safetensors only, read tensor by tensor into the parameter it fills with plain reads: no
pickle is ever loaded, no mapped copy of the file stays resident). A checkpoint that leaves any
parameter unfilled, or holds a tensor we would drop, is rejected rather than run with garbage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pice.shared.engine.models.base import CausalLM
from pice.shared.engine.models.gemma3 import Gemma3ForCausalLM
from pice.shared.engine.models.gguf_source import GGUFSource
from pice.shared.engine.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from pice.shared.engine.models.quantized import (
    Requantized,
    SafetensorsSource,
    WeightSource,
    build_quantized,
    densify,
)
from pice.shared.engine.models.safetensors_file import SafetensorsFile
from pice.shared.errors import ModelNotFoundError, UnsupportedModelError

# config.architectures[0] -> class; MODEL_TYPES is the fallback for configs without it.
ARCHITECTURES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}
MODEL_TYPES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
}
# Checkpoint tensors that carry no weights of ours (old checkpoints saved rope buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _pick_class(raw: dict[str, Any]) -> type[CausalLM]:
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    model_type = raw.get("model_type")
    if arch is None and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    raise UnsupportedModelError(
        f"unsupported model architecture {arch or model_type!r}; "
        f"supported: {', '.join(ARCHITECTURES)}")


def model_class(model_dir: str | Path) -> type[CausalLM]:
    """The engine class for `model_dir/config.json`; refuses an unsupported one (cheap: reads
    only the JSON, so admission can fail before anything heavy is loaded)."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{model_dir} has no config.json")
    return _pick_class(json.loads(config_path.read_text()))


QUANTIZATIONS = ("none", "gguf", "int8", "int4")


def build_model(model_dir: str | Path, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", *, gguf: str | Path | None = None,
                quantization: str = "none") -> CausalLM:
    """Instantiate the architecture named by `model_dir/config.json` and load its weights:
    from `*.safetensors` in `model_dir`, or from the `gguf` file when given. `quantization`:
    "none" (float `dtype` weights), "gguf" (the GGUF's own quantized tensors, kept as they
    are), "int8" / "int4" (weight-only, quantized on load). Quantized models run on the CPU in
    float32 activations."""
    model_dir = Path(model_dir)
    cls = model_class(model_dir)
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    files = sorted(model_dir.glob("*.safetensors"))
    if quantization == "gguf" and gguf is None:
        raise UnsupportedModelError(f"quantization 'gguf' needs a GGUF file for {model_dir}")
    if not files and gguf is None:
        raise UnsupportedModelError(f"{model_dir} has no *.safetensors weights")
    from transformers import AutoConfig  # lazy: transformers is slow to import

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = cls(config)
    if gguf is not None and (quantization != "none" or not files):
        source: WeightSource = GGUFSource(Path(gguf), config)
        if quantization in ("int8", "int4"):
            source = Requantized(source, 8 if quantization == "int8" else 4)
        model = build_quantized(model, source)
        if quantization == "none":
            model = densify(model, dtype).to(device)
        return model.eval().requires_grad_(False)
    if quantization != "none":
        bits = 8 if quantization == "int8" else 4
        model = build_quantized(model, Requantized(SafetensorsSource(files), bits))
        return model.eval().requires_grad_(False)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    load_safetensors(model, files)
    return model.eval().requires_grad_(False)


def _fused_target(model: CausalLM, name: str) -> tuple[torch.Tensor, int, int, str] | None:
    """For a checkpoint name like `...self_attn.k_proj.weight`: (our fused parameter, row offset,
    rows, coverage key), or None when the tensor is not part of a fused projection."""
    *path, leaf, param_name = name.split(".")
    if leaf not in model.fused_weights:
        return None
    fused, shard = model.fused_weights[leaf]
    try:
        owner = model.get_submodule(".".join(path))
        param = getattr(getattr(owner, fused), param_name)
    except AttributeError:
        return None  # reported as unexpected
    sizes: list[int] = getattr(owner, "fused_sizes")[fused]  # noqa: B009 (set by layers)
    key = f"{'.'.join(path)}.{fused}.{param_name}#{shard}"
    return param, sum(sizes[:shard]), sizes[shard], key


def _expected_keys(model: CausalLM) -> set[str]:
    """Coverage keys that a complete checkpoint fills: one per parameter, one per fused shard."""
    inverse: dict[str, int] = {}
    for fused, _ in model.fused_weights.values():
        inverse[fused] = inverse.get(fused, 0) + 1
    keys: set[str] = set()
    for name, _ in model.named_parameters():  # tied parameters are listed once
        leaf = name.split(".")[-2]  # e.g. "qkv_proj" in "...self_attn.qkv_proj.weight"
        if leaf in inverse:
            keys.update(f"{name}#{i}" for i in range(inverse[leaf]))
        else:
            keys.add(name)
    return keys


@torch.no_grad()
def load_safetensors(model: CausalLM, files: list[Path]) -> None:
    """Copy every checkpoint tensor into its (possibly fused) parameter, casting dtype and
    moving device on the way; reject unknown tensors and unfilled parameters."""
    params = dict(model.named_parameters())
    expected, seen, unexpected = _expected_keys(model), set(), []
    for file in files:
        f = SafetensorsFile(file)  # plain reads into each parameter: no mapped copy resident
        for name in f.names():
            if name.endswith(_IGNORED_SUFFIXES) or (
                    name == "lm_head.weight" and model.tie_word_embeddings):
                continue  # a tied head is the embedding; never load it twice
            target = _fused_target(model, name) if name not in params else None
            if target is not None:
                param, offset, rows, key = target
                dest = param.narrow(0, offset, rows)
            elif name in params:
                dest, key = params[name], name
            else:
                unexpected.append(name)
                continue
            f.read_into(name, dest)  # shapes checked; a dtype or device change: one temporary
            seen.add(key)
    if unexpected:
        raise UnsupportedModelError(f"unexpected weights in checkpoint: {unexpected[:5]}")
    missing = sorted(expected - seen)
    if missing:
        raise UnsupportedModelError(f"weights missing from checkpoint: {missing[:5]}")
