"""Adapter validation: every problem is refused with InvalidAdapterError naming it, before any
tensor is loaded; a valid adapter loads with its scaling folded into B."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pice.bench.lora_adapters import write_adapter
from pice.shared.errors import InvalidAdapterError
from pice.shared.lora.adapter import ModelShape, load_adapter, validate_adapter

# the tiny Qwen2 of tests/factories.py: hidden 64, 4 heads of 16, 2 kv heads, MLP 128, 2 layers
SHAPE = ModelShape("Qwen2ForCausalLM", 2, {
    "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
    "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}, 64)
WEIGHTS = "adapter_model.safetensors"


def make(tmp_path: Path, **kw: object) -> Path:
    opts: dict[str, object] = {"rank": 4, "alpha": 8.0, "targets": ("q_proj", "down_proj")}
    opts.update(kw)
    return write_adapter(tmp_path / "ad", SHAPE, dtype=torch.float32, **opts)  # type: ignore[arg-type]


def validate(path: Path, max_rank: int = 16, max_bytes: int = 10**7) -> object:
    return validate_adapter("t", path, SHAPE, max_rank=max_rank, max_bytes=max_bytes)


def edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def edit_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(path / WEIGHTS))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS))


def test_valid_adapter_loads_with_scaling(tmp_path: Path) -> None:
    path = make(tmp_path, rslora=True)
    spec = validate(path)
    assert spec.rank == 4 and spec.target_modules == ("q_proj", "down_proj")  # type: ignore[attr-defined]
    loaded = load_adapter(spec, torch.float32)  # type: ignore[arg-type]
    raw = load_file(str(path / WEIGHTS))
    a, b = loaded.weights[(1, "down_proj")]
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_"
    assert torch.equal(a, raw[key + "A.weight"])
    torch.testing.assert_close(b, raw[key + "B.weight"] * (8.0 / math.sqrt(4)))  # rsLoRA


def test_pickle_adapter_is_refused_unopened(tmp_path: Path) -> None:
    path = make(tmp_path)
    (path / WEIGHTS).rename(path / "adapter_model.bin")
    with pytest.raises(InvalidAdapterError, match="pickle"):
        validate(path)


@pytest.mark.parametrize(("config", "message"), [
    ({"r": 32}, r"rank r must be an integer in \[1, 16\]"),
    ({"r": "4"}, "rank r must be an integer"),
    ({"target_modules": ["q_proj", "lm_head"]}, r"target_modules \['lm_head'\] are not supported"),
    ({"target_modules": "q_proj|v_proj"}, "target_modules must be a non-empty list"),
    ({"use_dora": True}, "use_dora is not supported"),
    ({"peft_type": "IA3"}, "peft_type must be LORA"),
    ({"lora_alpha": -1}, "lora_alpha must be a number > 0"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save is not supported"),
    ({"target_modules": ["q_proj"]}, "down_proj is not in target_modules"),
])
def test_bad_config_is_refused(tmp_path: Path, config: dict[str, object], message: str) -> None:
    path = make(tmp_path)
    edit_config(path, **config)
    with pytest.raises(InvalidAdapterError, match=message):
        validate(path)


def test_shapes_of_another_model_are_refused(tmp_path: Path) -> None:
    other = ModelShape("Qwen2ForCausalLM", 2, dict(SHAPE.dims, q_proj=(96, 96)), 96)
    path = write_adapter(tmp_path / "ad", other, rank=4, alpha=8, targets=("q_proj",))
    with pytest.raises(InvalidAdapterError, match=r"has shape \[4, 96\], expected \[4, 64\]"):
        validate(path)


def test_layer_beyond_the_model_is_refused(tmp_path: Path) -> None:
    deeper = ModelShape("Qwen2ForCausalLM", 3, SHAPE.dims, 64)
    path = write_adapter(tmp_path / "ad", deeper, rank=4, alpha=8, targets=("q_proj",))
    with pytest.raises(InvalidAdapterError, match="layer 2 does not exist, the model has 2"):
        validate(path)


def test_bad_tensors_are_refused(tmp_path: Path) -> None:
    path = make(tmp_path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    edit_tensors(path, lambda t: t.__setitem__(key, t[key].to(torch.float64)))
    with pytest.raises(InvalidAdapterError, match="dtype F64"):
        validate(path)
    path = make(tmp_path / "2")
    edit_tensors(path, lambda t: t.pop(key))
    with pytest.raises(InvalidAdapterError, match="has lora_B but not both"):
        validate(path)
    path = make(tmp_path / "3")
    edit_tensors(path, lambda t: t.__setitem__("base_model.model.lm_head.weight",
                                               torch.zeros(2, 2)))
    with pytest.raises(InvalidAdapterError, match=r"unexpected tensor base_model\.model\.lm_head"):
        validate(path)


def test_size_cap_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    path = make(tmp_path)
    with pytest.raises(InvalidAdapterError, match="over the limit of 1000"):
        validate(path, max_bytes=1000)
    raw = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(raw[:-10])  # truncated data
    with pytest.raises(InvalidAdapterError, match="corrupt"):
        validate(path)
    (path / WEIGHTS).write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(InvalidAdapterError, match="invalid header length"):
        validate(path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapterError, match="not valid JSON"):
        validate(path)
    with pytest.raises(InvalidAdapterError, match="is not a directory"):
        validate(tmp_path / "nowhere")
