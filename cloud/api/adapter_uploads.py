"""The bytes of an adapter upload, bounded while they arrive: multipart parts and bodies cut off
at their cap as they stream (413), server-local imports confined to the allowed roots (a path
is checked before the filesystem is touched, symlinks leading outside are refused, only
regular files are read)."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncGenerator, Mapping
from pathlib import Path
from typing import IO

from fastapi import Request
from starlette.formparsers import MultiPartParser

from pice.cloud.adapter_catalog import ADAPTER_FILES
from pice.shared.errors import BadRequestError, PayloadTooLargeError


def copy_capped(src: IO[bytes], dst: Path, limit: int, field: str) -> None:
    written = 0
    with dst.open("wb") as out:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise PayloadTooLargeError(
                    f"{field} is over the {limit >> 20} MiB limit (adapter_upload_mb)", field=field)
            out.write(chunk)


def _shown(path: str) -> str:
    text = repr(path)
    return text if len(text) <= 120 else f"{text[:120]}... ({len(path)} characters)"


def _under(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def _import_dir(raw: str, roots: list[Path]) -> tuple[Path, list[Path]]:
    """The directory a JSON registration names, and the allowed roots it resolved under. A path
    outside every root is refused before the filesystem is touched (checked lexically), and
    again after symlinks are resolved."""
    if "\x00" in raw:
        raise BadRequestError("path must not contain NUL bytes", field="path")
    allowed = [Path(os.path.abspath(r)) for r in roots] + [Path(r).resolve() for r in roots]
    lexical = Path(os.path.normpath(os.path.abspath(raw)))  # no filesystem access
    if not _under(lexical, allowed):
        raise BadRequestError(
            f"path {_shown(raw)} is not under an allowed import directory "
            f"(adapter_import_dirs: {[str(Path(r)) for r in roots] or 'none configured'})",
            field="path")
    try:
        src = lexical.resolve(strict=True)
    except (OSError, RuntimeError):
        raise BadRequestError(f"path {_shown(raw)} does not exist", field="path") from None
    real_roots = [Path(r).resolve() for r in roots]
    if not _under(src, real_roots):
        raise BadRequestError(f"path {_shown(raw)} leads outside the import directories "
                              "(a symlink)", field="path")
    if not src.is_dir():
        raise BadRequestError(f"path {_shown(raw)} is not a directory", field="path")
    return src, real_roots


def stage_local(raw: str, staging: Path, roots: list[Path], limit: int) -> None:
    """Copy the two files of a server-local directory `raw` into `staging` (only under an
    allowed root; a file that is a symlink to anywhere outside the roots is refused, not
    followed)."""
    src, real_roots = _import_dir(raw, roots)
    for name in ADAPTER_FILES:
        try:
            real = (src / name).resolve(strict=True)
        except (OSError, RuntimeError):
            hint = ("; pickle (.bin) adapters are refused: save with safetensors"
                    if name.endswith(".safetensors") and (src / "adapter_model.bin").exists()
                    else "")
            raise BadRequestError(f"path {_shown(raw)} has no {name}{hint}",
                                  field="path") from None
        if not _under(real, real_roots):
            raise BadRequestError(f"path {_shown(raw)}: {name} is a symlink to a file "
                                  "outside the import directories; refused", field="path")
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) |
                         getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the server
        except OSError as exc:
            raise BadRequestError(f"path {_shown(raw)}: {name} cannot be opened "
                                  f"({exc.strerror})", field="path") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise BadRequestError(f"path {_shown(raw)}: {name} is not a regular "
                                      "file", field="path")
            copy_capped(f, staging / name, limit, "path")


class CappedParser(MultiPartParser):
    """Starlette's multipart parser, with every file part cut off at `limit` bytes while the
    body streams in: a chunked upload has no Content-Length to refuse up front, and nothing
    past the cap is ever spooled."""

    def __init__(self, request: Request, file_fields: Mapping[str, str],
                 stream: AsyncGenerator[bytes, None], limit: int) -> None:
        super().__init__(request.headers, stream, max_files=len(file_fields), max_fields=64)
        self.limit = limit
        self._part_bytes = 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._part_bytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is not None:
            self._part_bytes += end - start
            if self._part_bytes > self.limit:
                field = self._current_part.field_name
                raise PayloadTooLargeError(f"{field} is over the {self.limit >> 20} MiB limit "
                                           "(adapter_upload_mb)", field=field)
        super().on_part_data(data, start, end)


async def body_capped(request: Request, cap: int) -> AsyncGenerator[bytes, None]:
    """The request body, stopped with 413 as soon as it passes `cap` bytes."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > cap:
            raise PayloadTooLargeError(f"body is over {cap} bytes", field="body")
        yield chunk
