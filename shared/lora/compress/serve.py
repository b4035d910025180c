"""Reading a compressed store for serving: each cluster's basis (validated like any PEFT adapter:
it goes into a device slot) and the Σ_i of the adapters the engine has registered."""

from __future__ import annotations

from pathlib import Path

import torch

from pice.shared.lora.adapter import AdapterSpec, ModelShape, validate_adapter
from pice.shared.lora.compress.store import load_manifest, read_sigma

Cores = dict[tuple[int, str], torch.Tensor]


def read_store(root: Path, shape: ModelShape, registered: set[str], max_rank: int,
               max_bytes: int) -> tuple[dict[str, AdapterSpec],
                                        dict[str, tuple[str, str, int, Cores]]]:
    """(basis spec per cluster used, {adapter: (cluster, "full" | "diag", rank, cores)}) for
    the compressed adapters of the store that are in `registered`."""
    manifest = load_manifest(root)
    sigmas: dict[str, tuple[str, str, int, Cores]] = {}
    clusters: dict[str, AdapterSpec] = {}
    for name, entry in sorted(manifest["adapters"].items()):
        if entry.get("status") != "compressed" or name not in registered:
            continue
        cid = entry["cluster"]
        if cid not in clusters:
            clusters[cid] = validate_adapter(f"~basis/{cid}", root / "clusters" / cid, shape,
                                             max_rank=max_rank, max_bytes=max_bytes)
        cores = read_sigma(root / entry["sigma"])
        sigmas[name] = (cid, entry["method"], int(entry["rank"]), cores)
    return clusters, sigmas


def shape_from_config(model_dir: Path) -> ModelShape:
    """The projection sizes of an HF model directory, from its config.json alone (the engine
    architecture name included), so compression never loads the model."""
    import json

    from pice.shared.engine.models import model_class

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    raw = raw.get("text_config", raw) if "hidden_size" not in raw else raw
    hd = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    h, q, kv, inter = (raw["hidden_size"], raw["num_attention_heads"] * hd,
                       raw["num_key_value_heads"] * hd, raw["intermediate_size"])
    return ModelShape(model_class(Path(model_dir)).__name__, raw["num_hidden_layers"], {
        "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}, h)
