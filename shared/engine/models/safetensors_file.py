"""Read safetensors tensors with plain file reads straight into their destination.

`safe_open` maps the whole file, and the pages it touches stay resident (counted in the RSS) for
as long as the file is open: a load that copies every tensor out of the mapping peaks at about
twice the model. Here each tensor is read into the parameter it fills (or one temporary of its
own size when the dtype differs), so the peak is the model plus one tensor. The format is an
8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then
the raw little-endian data; nothing in it is executable (no pickle)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from pice.shared.errors import UnsupportedModelError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_MAX_HEADER = 100 << 20


class SafetensorsFile:
    """The tensor index of one .safetensors file; tensors are read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise UnsupportedModelError(f"{self.path}: safetensors header of {n} bytes")
            header = json.loads(f.read(n))
        base = 8 + n
        # name -> (dtype, shape, absolute start, bytes)
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in DTYPES:
                raise UnsupportedModelError(f"{self.path}: tensor {name} has dtype "
                                            f"{info['dtype']}")
            begin, end = info["data_offsets"]
            self.entries[name] = (DTYPES[info["dtype"]], tuple(info["shape"]), base + begin,
                                  end - begin)

    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, _, _ = self.entries[name]
        out = torch.empty(shape, dtype=dtype)
        self._read_raw(name, out)
        return out

    def read_into(self, name: str, dest: torch.Tensor) -> None:
        """Fill `dest` (same shape) with the tensor, casting when the dtypes differ."""
        dtype, shape, _, _ = self.entries[name]
        if tuple(dest.shape) != shape:
            raise UnsupportedModelError(f"weight {name} has shape {shape}, expected "
                                        f"{tuple(dest.shape)}")
        if dest.dtype == dtype and dest.is_contiguous() and dest.device.type == "cpu":
            self._read_raw(name, dest)
        else:
            dest.copy_(self.read(name))

    def _read_raw(self, name: str, dest: torch.Tensor) -> None:
        _, _, start, nbytes = self.entries[name]
        view = dest.detach().reshape(-1).view(torch.uint8).numpy()  # dest's own bytes
        if view.nbytes != nbytes:
            raise UnsupportedModelError(f"{self.path}: tensor {name} holds {nbytes} bytes, "
                                        f"its shape and dtype need {view.nbytes}")
        with open(self.path, "rb") as f:
            f.seek(start)
            if f.readinto(view.data) != nbytes:  # a flat uint8 array: its buffer is the bytes
                raise UnsupportedModelError(f"{self.path} is truncated at {name}")
