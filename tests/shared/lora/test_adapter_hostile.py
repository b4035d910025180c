"""Hostile adapter files: every crafted safetensors header or config is refused with an
InvalidAdapterError naming the problem (never another exception, which the API would turn into a
500), and whatever validation accepts is exactly what loads: validation runs the loader."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from pice.bench.lora_adapters import write_adapter
from pice.shared.errors import InvalidAdapterError
from pice.shared.lora.adapter import load_adapter, validate_adapter
from tests.shared.lora.test_adapter import SHAPE, WEIGHTS, edit_config

pytestmark = pytest.mark.fault

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # [4, 64] float32
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"  # [64, 4] float32
N = 4 * 64 * 4  # bytes of each


def adapter(tmp_path: Path, dtype: torch.dtype = torch.float32) -> Path:
    return write_adapter(tmp_path / "ad", SHAPE, rank=4, alpha=8, targets=("q_proj",),
                         dtype=dtype, base_model=None)


def validate(path: Path, dtype: torch.dtype = torch.float32) -> object:
    return validate_adapter("t", path, SHAPE, max_rank=16, max_bytes=10**7, dtype=dtype)


def entry(start: Any, end: Any, shape: Any = None, dtype: Any = "F32") -> dict[str, Any]:
    return {"dtype": dtype, "shape": [4, 64] if shape is None else shape,
            "data_offsets": [start, end]}


def write_raw(path: Path, header: Any, data: bytes = b"\0" * (2 * N),
              header_bytes: bytes | None = None) -> None:
    raw = header_bytes if header_bytes is not None else json.dumps(header).encode()
    (path / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def both(a: dict[str, Any], b: dict[str, Any] | None = None) -> dict[str, Any]:
    return {A: a, B: b if b is not None else {"dtype": "F32", "shape": [64, 4],
                                               "data_offsets": [N, 2 * N]}}


LONG = "base_model.model.model.layers.0." + "x" * 5000
# (header, message): each a header a careless or hostile client could send
HEADERS: list[tuple[Any, str]] = [
    (both({"dtype": "F32", "shape": [4, 64], "data_offsets": ["0", str(N)]}),
     "data_offsets must be two integers"),
    (both({"dtype": "F32", "shape": [4, 64], "data_offsets": {"a": 0, "b": N}}),
     "data_offsets must be two integers"),
    (both(entry(0.0, float(N))), "data_offsets must be two integers"),
    (both(entry(False, True)), "data_offsets must be two integers"),
    (both({"dtype": "F32", "shape": [4, 64], "data_offsets": [0, N, 2 * N]}),
     "data_offsets must be two integers"),
    (both(entry(-N, 0)), "do not match its shape"),
    (both(entry(0, N), {"dtype": "F32", "shape": [64, 4], "data_offsets": [0, N]}),
     "overlaps the previous tensor"),
    (both(entry(N // 2, N // 2 + N), {"dtype": "F32", "shape": [64, 4],
                                      "data_offsets": [N // 2 + N, 2 * N + N // 2]}),
     "do not match its shape"),  # runs past the end of the file
    (both(entry(0, N), {"dtype": "F32", "shape": [32, 4], "data_offsets": [N + N // 2, 2 * N]}),
     "leaves a gap"),
    ({A: entry(0, N)}, "bytes after the last tensor"),
    ({A: [0, N]}, "malformed header entry"),
    ({A: "F32"}, "malformed header entry"),
    (both({**entry(0, N), "extra": 1}), "malformed header entry"),
    (both(entry(0, N, shape=[4.0, 64.0])), "malformed shape"),
    (both(entry(0, N, shape=["4", "64"])), "malformed shape"),
    (both(entry(0, N, shape=[-4, -64])), "malformed shape"),
    (both(entry(0, N, shape=[2**40, 0])), "malformed shape"),
    (both(entry(0, N, dtype=["F32"])), "has dtype"),
    (both(entry(0, N, dtype="F64")), "has dtype F64"),
    ({"a\x00b": entry(0, N), B: both(entry(0, N))[B]}, "is not a valid tensor name"),
    ({LONG: entry(0, N), B: both(entry(0, N))[B]}, r"is not a valid tensor name"),
    ([A, B], "header must be a JSON object"),
    ({"__metadata__": {"format": {"nested": 1}}, **both(entry(0, N))},
     "__metadata__ must map names to strings"),
]


@pytest.mark.parametrize(("header", "message"), HEADERS,
                         ids=[f"h{i}-{m.split()[0]}" for i, (_, m) in enumerate(HEADERS)])
def test_crafted_headers_are_refused_by_name(tmp_path: Path, header: Any, message: str) -> None:
    path = adapter(tmp_path)
    write_raw(path, header)
    with pytest.raises(InvalidAdapterError, match=message) as err:
        validate(path)
    assert len(str(err.value)) < 400  # a 5,000-character name is not echoed whole


@pytest.mark.parametrize(("raw", "message"), [
    (b"[" * 100_000, "not valid JSON"),  # nesting deep enough to blow a recursive parser
    (b'{"\xff\xfe": 1}', "not valid JSON"),
    (b'{"a": NaN}', "malformed header entry"),
    (b"\x00" * 64, "not valid JSON"),
])
def test_unparseable_headers_are_refused(tmp_path: Path, raw: bytes, message: str) -> None:
    path = adapter(tmp_path)
    write_raw(path, None, header_bytes=raw)
    with pytest.raises(InvalidAdapterError, match=message):
        validate(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", [A, B])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path: Path, bad: float,
                                                          key: str) -> None:
    path = adapter(tmp_path)
    tensors = load_file(str(path / WEIGHTS))
    tensors[key][1, 2] = bad
    save_file(tensors, str(path / WEIGHTS))
    with pytest.raises(InvalidAdapterError, match=rf"tensor {key} holds non-finite values"):
        validate(path)


def test_weights_that_overflow_the_engine_dtype_are_refused(tmp_path: Path) -> None:
    path = adapter(tmp_path)
    tensors = load_file(str(path / WEIGHTS))
    tensors[B][0, 0] = 60000.0  # finite in float16, but times the scaling 8/4 it is not
    save_file(tensors, str(path / WEIGHTS))
    validate(path)  # fine for a float32 engine
    with pytest.raises(InvalidAdapterError, match=rf"tensor {B} holds non-finite.*float16"):
        validate(path, dtype=torch.float16)


def test_what_validates_is_what_loads(tmp_path: Path) -> None:
    path = adapter(tmp_path, dtype=torch.float16)
    spec = validate(path, dtype=torch.bfloat16)
    loaded = load_adapter(spec, torch.bfloat16)  # type: ignore[arg-type]
    assert set(loaded.weights) == {(0, "q_proj"), (1, "q_proj")}
    # the file changed after validation (a crafted header swapped in): a clear refusal
    write_raw(path, both(entry(0, N), {"dtype": "F32", "shape": [64, 4], "data_offsets": [0, N]}))
    with pytest.raises(InvalidAdapterError, match="cannot be read"):
        load_adapter(spec, torch.bfloat16)  # type: ignore[arg-type]


@pytest.mark.parametrize("base", ["a\x00b", "/" + "x" * 5000, {"path": "/etc"}, ["/etc"], 7])
def test_hostile_base_model_names_are_refused(tmp_path: Path, base: object) -> None:
    path = adapter(tmp_path)
    edit_config(path, base_model_name_or_path=base)
    with pytest.raises(InvalidAdapterError, match="base_model_name_or_path must be a name"):
        validate(path)


def test_base_model_path_is_never_read(tmp_path: Path) -> None:
    """A config naming a directory on the server is an opaque label: what lies there is neither
    read nor echoed (the adapter is judged by its tensors' shapes)."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 99}))
    path = adapter(tmp_path)
    edit_config(path, base_model_name_or_path=str(secret))
    spec = validate(path)
    assert spec.base_model == str(secret)  # type: ignore[attr-defined]
