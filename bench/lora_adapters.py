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
