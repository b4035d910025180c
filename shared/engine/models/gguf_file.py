"""A minimal GGUF header reader: the architecture, other string/number metadata on request,
and every tensor's type, shape and absolute file offset. (gguf.GGUFReader parses all metadata
into numpy parts, the 150k-entry vocabulary included, which takes 5-20 s; this skips what it
does not need.)"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pice.shared.errors import UnsupportedModelError

# value type -> struct format of a scalar (8: string, 9: array are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order: [rows, k] for a matrix
    offset: int  # absolute, in the file


@dataclass
class GGUFHeader:
    metadata: dict[str, Any]  # scalars and strings (arrays are skipped: value None)
    tensors: dict[str, TensorInfo]

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise UnsupportedModelError("GGUF has no general.architecture")
        return arch


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _SCALARS:
                self.pos += struct.calcsize(_SCALARS[etype]) * count
            else:
                for _ in range(count):
                    self.value(etype)
            return None
        raise UnsupportedModelError(f"GGUF metadata has an unknown value type {vtype}")


def read_header(path: str | Path) -> GGUFHeader:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf)
        if bytes(buf[:4]) != b"GGUF":
            raise UnsupportedModelError(f"{path} is not a GGUF file")
        c.pos = 4
        version = c.unpack("<I")
        if version < 2:
            raise UnsupportedModelError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            metadata[key] = c.value(c.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.unpack("<Q") for _ in range(c.unpack("<I"))]
            infos.append((name, c.unpack("<I"), tuple(reversed(dims)), c.unpack("<Q")))
        align = int(metadata.get("general.alignment") or 32)
        start = -(-c.pos // align) * align
    tensors = {n: TensorInfo(n, t, s, start + off) for n, t, s, off in infos}
    return GGUFHeader(metadata, tensors)
