"""Plain-read safetensors against the safetensors library, casting into a destination, and a
truncated file refused."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pice.shared.engine.models.safetensors_file import SafetensorsFile
from pice.shared.errors import UnsupportedModelError


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(7, 5, generator=g),
               "b.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
               "c.bias": torch.randn(6, generator=g).half(),
               "d.ids": torch.arange(4, dtype=torch.int64), "e.scalar": torch.tensor(2.5)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_reads_equal_the_library(checkpoint: Path) -> None:
    want = load_file(str(checkpoint))
    f = SafetensorsFile(checkpoint)
    assert sorted(f.names()) == sorted(want)
    for name, tensor in want.items():
        got = f.read(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def test_read_into_fills_a_slice_and_casts(checkpoint: Path) -> None:
    want = load_file(str(checkpoint))
    f = SafetensorsFile(checkpoint)
    fused = torch.zeros(10, 5)
    f.read_into("a.weight", fused.narrow(0, 3, 7))  # a row slice of a fused parameter
    assert torch.equal(fused[3:], want["a.weight"]) and not fused[:3].any()
    wide = torch.empty(3, 4)
    f.read_into("b.weight", wide)  # bf16 on disk, float32 in the model
    assert torch.equal(wide, want["b.weight"].float())
    with pytest.raises(UnsupportedModelError, match="shape"):
        f.read_into("a.weight", torch.empty(5, 7))


def test_truncated_file_is_refused(checkpoint: Path) -> None:
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[:-8])
    f = SafetensorsFile(checkpoint)
    with pytest.raises(UnsupportedModelError, match="truncated"):
        for name in f.names():
            f.read(name)
