"""The compressed store on disk (safetensors + JSON, never pickle):

  manifest.json                  method, budget, clusters, per-adapter report, totals
  clusters/<cid>/                the cluster's basis as a plain PEFT adapter: lora_A = Vᵀ [r, in],
                                 lora_B = U [out, r], lora_alpha = r (scaling 1), so it loads
                                 into a device slot like any adapter
  sigma/<key>.safetensors        one adapter's cores: "<layer>.<proj>" -> Σ [r, r] or σ [r]
  work/<group>.*.json            resumable progress (trials done, group finished)

Deleting an adapter's Σ is one unlink plus a manifest rewrite (`drop_sigma`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pice.shared.lora.adapter import TARGETS
from pice.shared.lora.compress.jd import Basis

MANIFEST = "manifest.json"
Module = tuple[int, str]


def write_json(path: Path, data: Any) -> None:
    """Atomic replace (a crash leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def sigma_key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:24]


def _peft_key(layer: int, proj: str, ab: str) -> str:
    return f"base_model.model.model.layers.{layer}.{TARGETS[proj]}.{proj}.lora_{ab}.weight"


def write_basis(directory: Path, bases: dict[Module, Basis], rank: int) -> None:
    """A cluster's basis as a PEFT adapter directory (A = Vᵀ, B = U, zero-padded to `rank`)."""
    tensors = {}
    for (layer, proj), basis in bases.items():
        r = basis.rank
        a = torch.zeros(rank, basis.v.shape[0], dtype=torch.float32)  # [rank, in]
        b = torch.zeros(basis.u.shape[0], rank, dtype=torch.float32)  # [out, rank]
        a[:r] = basis.v.T.float()
        b[:, :r] = basis.u.float()
        tensors[_peft_key(layer, proj, "A")] = a
        tensors[_peft_key(layer, proj, "B")] = b
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    targets = [p for p in TARGETS if any(p == proj for _, proj in bases)]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
              "use_rslora": False, "target_modules": targets, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True}
    write_json(directory / "adapter_config.json", config)


def write_sigma(path: Path, cores: dict[Module, torch.Tensor], rank: int, name: str,
                cluster: str) -> None:
    """One adapter's cores, zero-padded to the cluster rank: [rank, rank] or [rank]."""
    tensors = {}
    for (layer, proj), core in cores.items():
        r = core.shape[0]
        out = torch.zeros((rank,) * core.dim(), dtype=torch.float32)
        out[(slice(0, r),) * core.dim()] = core.float()
        tensors[f"{layer}.{proj}"] = out
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"adapter": name, "cluster": cluster})
    os.replace(tmp, path)


def read_sigma(path: Path) -> dict[Module, torch.Tensor]:
    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            layer, proj = key.split(".", 1)
            out[(int(layer), proj)] = f.get_tensor(key)
    return out


def load_manifest(root: Path) -> dict[str, Any]:
    data = read_json(Path(root) / MANIFEST)
    if not isinstance(data, dict) or "adapters" not in data:
        raise FileNotFoundError(f"{root} holds no compressed store ({MANIFEST} missing)")
    return data


def drop_sigma(root: Path, name: str) -> bool:
    """Remove one adapter's Σ from the store at once; the basis stays until the next
    compression refits it. True when it was there."""
    root = Path(root)
    manifest = read_json(root / MANIFEST)
    if not isinstance(manifest, dict):
        return False
    entry = manifest.get("adapters", {}).pop(name, None)
    (root / "sigma" / f"{sigma_key(name)}.safetensors").unlink(missing_ok=True)
    if entry is not None:
        write_json(root / MANIFEST, manifest)
    return entry is not None
