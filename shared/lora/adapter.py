"""PEFT LoRA adapters: validation from the JSON config and the safetensors header alone (nothing
is loaded before the adapter is known to fit the model), then loading into compute tensors.

A PEFT adapter directory holds adapter_config.json and adapter_model.safetensors with keys like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]). The delta of a projection is `B @ A * scaling` with scaling = alpha / r, or
alpha / sqrt(r) for rsLoRA. Pickle files (adapter_model.bin) are never opened."""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel
from safetensors import safe_open

from pice.shared.errors import InvalidAdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# The projections an adapter may target, and the sub-module of a decoder layer holding each.
TARGETS: dict[str, str] = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
MAX_RANK_LIMIT = 128
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\."
                  r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])\.weight$")
_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}
_MAX_HEADER = 16 * 2**20  # a safetensors header larger than this is refused unread
_MAX_CONFIG = 2**20
_MAX_NAME = 512  # longest tensor name or base model name accepted
# Config fields that change the math in ways the batched kernels do not implement.
_UNSUPPORTED_FLAGS = ("use_dora", "fan_in_fan_out", "lora_bias", "use_qalora")


class AdapterInfo(BaseModel):
    """What the API and the pool report about one registered adapter."""

    name: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    size_bytes: int  # of the safetensors file
    tier: Literal["disk", "host", "device"]  # fastest tier holding it
    base_model: str | None = None  # base_model_name_or_path from its config
    compressed: str | None = None  # the cluster whose shared basis serves it (compressed)


@dataclass(frozen=True)
class ModelShape:
    """The engine model an adapter must match: layer count and (in, out) features of each
    projection, per HF name (e.g. "k_proj": (hidden, kv_heads * head_dim))."""

    architecture: str
    num_layers: int
    dims: dict[str, tuple[int, int]]
    hidden_size: int


@dataclass(frozen=True)
class AdapterSpec:
    """A validated adapter: everything needed to load it, read from the files' headers."""

    name: str
    path: Path  # the safetensors file
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    size_bytes: int
    base_model: str | None
    keys: dict[tuple[int, str], tuple[str, str]] = field(default_factory=dict)
    # keys[(layer, "q_proj")] = (lora_A key, lora_B key)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass
class LoadedAdapter:
    """Weights in the compute dtype, scaling folded into B: weights[(layer, proj)] = (A [r, in],
    B * scaling [out, r])."""

    spec: AdapterSpec
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def _bad(name: str, problem: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"adapter {name!r}: {problem}", field="adapter")


def _read_config(name: str, directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise _bad(name, f"{directory} is not a directory")
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise _bad(name, f"{CONFIG_FILE} is missing")
    if cfg_path.stat().st_size > _MAX_CONFIG:
        raise _bad(name, f"{CONFIG_FILE} is larger than {_MAX_CONFIG} bytes")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(name, f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise _bad(name, f"{CONFIG_FILE} must hold a JSON object")
    return cfg


def _check_config(name: str, cfg: dict[str, Any], max_rank: int) -> tuple[int, float, bool,
                                                                         tuple[str, ...]]:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _bad(name, f"peft_type must be LORA, got {cfg.get('peft_type')!r}")
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise _bad(name, f"task_type must be CAUSAL_LM, got {cfg.get('task_type')!r}")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= max_rank:
        raise _bad(name, f"rank r must be an integer in [1, {max_rank}] (the configured maximum), "
                         f"got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not alpha > 0:
        raise _bad(name, f"lora_alpha must be a number > 0, got {alpha!r}")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise _bad(name, f"use_rslora must be true or false, got {rslora!r}")
    for flag in _UNSUPPORTED_FLAGS:
        if cfg.get(flag):
            raise _bad(name, f"{flag} is not supported")
    if cfg.get("bias", "none") != "none":
        raise _bad(name, f"bias must be 'none', got {cfg.get('bias')!r}")
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication",
                "trainable_token_indices", "target_parameters"):
        if cfg.get(key):
            raise _bad(name, f"{key} is not supported (got {cfg[key]!r})")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets or \
            not all(isinstance(t, str) for t in targets):
        raise _bad(name, f"target_modules must be a non-empty list of module names, "
                         f"got {targets!r}")
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise _bad(name, f"target_modules {unknown} are not supported; allowed: "
                         f"{', '.join(TARGETS)}")
    return r, float(alpha), rslora, tuple(t for t in TARGETS if t in targets)


def _check_base(name: str, cfg: dict[str, Any]) -> str | None:
    """base_model_name_or_path is an opaque label: reported, compared by nobody, and never
    opened as a path (an uploaded config must not make the server read its own disk). Whether
    the adapter fits the model is decided by its tensors' shapes."""
    base = cfg.get("base_model_name_or_path")
    if base is None or base == "":
        return None
    if not isinstance(base, str) or len(base) > _MAX_NAME or \
            any(ord(c) < 32 or ord(c) == 127 for c in base):
        raise _bad(name, f"base_model_name_or_path must be a name of at most {_MAX_NAME} "
                         f"printable characters, got {_show(base)}")
    return base


def _show(value: object, limit: int = 120) -> str:
    """A value for a message: a short printable string as is, anything else as a bounded repr
    (a hostile file's names can be megabytes long, or hold NUL bytes)."""
    if isinstance(value, str) and len(value) <= limit and value.isprintable():
        return value
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_header(name: str, path: Path, size: int) -> dict[str, Any]:
    """The tensor entries of a safetensors file, checked as strictly as the format demands:
    integer offsets that tile the data region exactly (no gap, no overlap, nothing out of
    range), known dtypes, sizes that match shapes. Any other header is refused with a message
    naming the tensor."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(name, f"{WEIGHTS_FILE} is truncated")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise _bad(name, f"{WEIGHTS_FILE} has an invalid header length {length}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise _bad(name, f"{WEIGHTS_FILE} header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _bad(name, f"{WEIGHTS_FILE} header must be a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and
                                 all(isinstance(v, str) for v in meta.values())):
        raise _bad(name, f"{WEIGHTS_FILE} __metadata__ must map names to strings")
    data_size = size - 8 - length
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        shown = _show(key)
        if len(key) > _MAX_NAME or "\x00" in key:
            raise _bad(name, f"tensor name {shown} is not a valid tensor name")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _bad(name, f"tensor {shown} has a malformed header entry (it needs exactly "
                             "dtype, shape and data_offsets)")
        dtype, tshape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise _bad(name, f"tensor {shown} has dtype {_show(dtype)}; allowed: "
                             f"{', '.join(_DTYPES)}")
        if not (isinstance(tshape, list) and len(tshape) <= 8 and
                all(_int(d) and 0 <= d < 2**31 for d in tshape)):
            raise _bad(name, f"tensor {shown} has a malformed shape {_show(tshape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_int, offsets))):
            raise _bad(name, f"tensor {shown}: data_offsets must be two integers, got "
                             f"{_show(offsets)}")
        start, end = offsets
        if not 0 <= start <= end <= data_size or end - start != math.prod(tshape) * _DTYPES[dtype]:
            raise _bad(name, f"tensor {shown}: data offsets do not match its shape "
                             "(corrupt file)")
        spans.append((start, end, shown))
    pos = 0
    for start, end, shown in sorted(spans):
        if start != pos:
            problem = "overlaps the previous tensor" if start < pos else "leaves a gap before it"
            raise _bad(name, f"tensor {shown}: its data {problem} (corrupt file)")
        pos = end
    if pos != data_size:
        raise _bad(name, f"{WEIGHTS_FILE} has {data_size - pos} bytes after the last tensor "
                         "(corrupt file)")
    return header


def validate_adapter(name: str, directory: Path, shape: ModelShape, *, max_rank: int,
                     max_bytes: int, dtype: torch.dtype = torch.float32) -> AdapterSpec:
    """Check an adapter directory against the model, headers first, then by loading it with
    the very code that serves it (`load_adapter`, in the engine's `dtype`): an adapter that
    passes loads, and holds only finite weights. Raise InvalidAdapterError naming the first
    problem found."""
    directory = Path(directory)
    cfg = _read_config(name, directory)
    rank, alpha, rslora, targets = _check_config(name, cfg, max_rank)
    base = _check_base(name, cfg)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p for p in PICKLE_FILES if (directory / p).exists()]
        if pickles:
            raise _bad(name, f"{pickles[0]} is a pickle file and is refused; save the adapter "
                             f"as {WEIGHTS_FILE} (safe_serialization=True)")
        raise _bad(name, f"{WEIGHTS_FILE} is missing")
    size = weights.stat().st_size
    if size > max_bytes:
        raise _bad(name, f"{WEIGHTS_FILE} is {size} bytes, over the limit of {max_bytes}")
    header = _read_header(name, weights, size)
    keys: dict[tuple[int, str], dict[str, str]] = {}
    for key, entry in header.items():
        m = _KEY.match(key)
        if m is None:
            raise _bad(name, f"unexpected tensor {key} (only lora_A/lora_B of "
                             f"{', '.join(TARGETS)} are supported)")
        layer, parent, proj, ab = int(m[1]), m[2], m[3], m[4]
        if parent != TARGETS[proj]:
            raise _bad(name, f"tensor {key}: {proj} does not belong to {parent}")
        if layer >= shape.num_layers:
            raise _bad(name, f"tensor {key}: layer {layer} does not exist, the model has "
                             f"{shape.num_layers} layers")
        if proj not in targets:
            raise _bad(name, f"tensor {key}: {proj} is not in target_modules {list(targets)}")
        fan_in, fan_out = shape.dims[proj]
        want = [rank, fan_in] if ab == "A" else [fan_out, rank]
        if entry["shape"] != want:
            raise _bad(name, f"tensor {key} has shape {entry['shape']}, expected {want} "
                             f"(rank {rank}; the model's {proj} is {fan_in} -> {fan_out})")
        keys.setdefault((layer, proj), {})[ab] = key
    if not keys:
        raise _bad(name, f"{WEIGHTS_FILE} holds no LoRA tensors")
    for (layer, proj), pair in keys.items():
        if set(pair) != {"A", "B"}:
            raise _bad(name, f"layer {layer} {proj} has lora_{''.join(pair)} but not both A and B")
    spec = AdapterSpec(name=name, path=weights, rank=rank, alpha=alpha, use_rslora=rslora,
                       target_modules=targets, size_bytes=size, base_model=base,
                       keys={k: (v["A"], v["B"]) for k, v in sorted(keys.items())})
    load_adapter(spec, dtype)  # the loader is the last check: what passes here, serves
    return spec


def load_adapter(spec: AdapterSpec, dtype: torch.dtype) -> LoadedAdapter:
    """Read a validated adapter into host tensors of `dtype` (scaling folded into B). Raises
    InvalidAdapterError naming the tensor when the file cannot be read as validated or a
    weight is (or, scaled into `dtype`, becomes) NaN or Inf."""
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    scaling = spec.scaling
    try:
        with safe_open(str(spec.path), framework="pt", device="cpu") as f:
            for target, (key_a, key_b) in spec.keys.items():
                a = f.get_tensor(key_a).to(dtype).contiguous()  # [r, in]
                b = (f.get_tensor(key_b).float() * scaling).to(dtype).contiguous()  # [out, r]
                for key, t in ((key_a, a), (key_b, b)):
                    if not bool(torch.isfinite(t).all()):
                        raise _bad(spec.name, f"tensor {key} holds non-finite values (NaN or "
                                              f"Inf, as {str(dtype).removeprefix('torch.')} "
                                              "with the scaling applied to B)")
                weights[target] = (a, b)
    except InvalidAdapterError:
        raise
    except Exception as exc:  # safetensors refused the file: say so, never a 500
        raise _bad(spec.name, f"{WEIGHTS_FILE} cannot be read: {_show(str(exc), 200)}") from None
    return LoadedAdapter(spec, weights)
