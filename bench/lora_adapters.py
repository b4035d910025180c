"""Random LoRA adapters in PEFT format for tests and the `pice bench lora` trace: made with peft
itself (`peft_adapter`), or written directly in peft's file layout (`write_adapter`, fast enough
for a thousand adapters). B is random too (peft initializes it to zero), so every adapter
changes the model's output."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pice.shared.lora.adapter import TARGETS, ModelShape

ALL_TARGETS = tuple(TARGETS)


def peft_adapter(base: Any, out_dir: Path, *, rank: int, alpha: int,
                 targets: Sequence[str], rslora: bool = False, seed: int = 0,
                 std: float = 0.05) -> Path:
    """Wrap a copy of the transformers model `base` with peft, fill A and B with seeded
    N(0, std) values, save the adapter (safetensors) to out_dir."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                     use_rslora=rslora, task_type="CAUSAL_LM", lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    model.save_pretrained(str(out_dir))
    return out_dir


def write_adapter(out_dir: Path, shape: ModelShape, *, rank: int, alpha: float,
                  targets: Sequence[str], rslora: bool = False, seed: int = 0,
                  std: float = 0.02, base_model: str | None = None,
                  dtype: torch.dtype = torch.float16) -> Path:
    """The same files peft writes (adapter_config.json + adapter_model.safetensors), made
    without building a peft model."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.num_layers):
        for proj in targets:
            fan_in, fan_out = shape.dims[proj]
            prefix = f"base_model.model.model.layers.{layer}.{TARGETS[proj]}.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen)
                                                  * std).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen)
                                                  * std).to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "use_rslora": rslora, "target_modules": list(targets), "lora_dropout": 0.0,
              "bias": "none", "base_model_name_or_path": base_model, "fan_in_fan_out": False,
              "inference_mode": True}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def write_shared_adapters(root: Path, shape: ModelShape, n: int, *, clusters: int, rank: int,
                          subspace: int, targets: Sequence[str], noise: float = 0.05,
                          std: float = 0.02, alpha: float | None = None, seed: int = 0,
                          base_model: str | None = None, prefix: str = "lora-",
                          dtype: torch.dtype = torch.float16) -> list[Path]:
    """n rank-`rank` adapters in PEFT layout whose A rows and B columns lie, per module, in one
    of `clusters` shared `subspace`-dimensional subspaces, plus relative `noise`: the
    compressible population Compress then Serve targets (adapter i is in cluster i % clusters).
    Each adapter draws its own coefficients (its own seed)."""
    gen = torch.Generator().manual_seed(seed)
    bases = [{(layer, p): (torch.randn(shape.dims[p][0], subspace, generator=gen),
                           torch.randn(shape.dims[p][1], subspace, generator=gen))
              for layer in range(shape.num_layers) for p in targets} for _ in range(clusters)]
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 1000003 + i + 1)
        tensors = {}
        for (layer, proj), (v, u) in bases[i % clusters].items():
            fan_in, fan_out = shape.dims[proj]
            a = torch.randn(rank, subspace, generator=g) @ v.T / subspace ** 0.5  # [r, in]
            b = u @ torch.randn(subspace, rank, generator=g) / subspace ** 0.5  # [out, r]
            a += noise * torch.randn(rank, fan_in, generator=g)
            b += noise * torch.randn(fan_out, rank, generator=g)
            pre = f"base_model.model.model.layers.{layer}.{TARGETS[proj]}.{proj}"
            tensors[f"{pre}.lora_A.weight"] = (a * std).to(dtype)
            tensors[f"{pre}.lora_B.weight"] = (b * std).to(dtype)
        out = root / f"{prefix}{i}"
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
                  "lora_alpha": alpha if alpha is not None else 2 * rank, "use_rslora": False,
                  "target_modules": list(targets), "lora_dropout": 0.0, "bias": "none",
                  "base_model_name_or_path": base_model, "fan_in_fan_out": False,
                  "inference_mode": True}
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        paths.append(out)
    return paths


def materialize(store: Path, name: str, out_dir: Path) -> Path:
    """A compressed adapter written back as a plain PEFT LoRA: B' = U Σ_i, A' = Vᵀ (rank r,
    alpha r: scaling 1) — what peft runs to check the compressed serving path."""
    from safetensors import safe_open

    from pice.shared.lora.compress.store import load_manifest, read_sigma

    entry = load_manifest(store)["adapters"][name]
    cores = read_sigma(store / entry["sigma"])
    basis = store / "clusters" / entry["cluster"]
    tensors = {}
    with safe_open(str(basis / "adapter_model.safetensors"), framework="pt") as f:
        for (layer, proj), core in cores.items():
            pre = f"base_model.model.model.layers.{layer}.{TARGETS[proj]}.{proj}"
            vt = f.get_tensor(f"{pre}.lora_A.weight")  # [r, in]
            u = f.get_tensor(f"{pre}.lora_B.weight")  # [out, r]
            sigma = core if core.dim() == 2 else torch.diag(core)  # [r, r]
            tensors[f"{pre}.lora_A.weight"] = vt.contiguous()
            tensors[f"{pre}.lora_B.weight"] = (u @ sigma).contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    r = int(entry["rank"])
    targets = [p for p in TARGETS if any(p == proj for _, proj in cores)]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r,
              "use_rslora": False, "target_modules": targets, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir
