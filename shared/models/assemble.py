"""Concatenate a packaged model's chunks into one verified GGUF under `<cache>/gguf/`.

The final path only ever receives a file whose sha256 matched: bytes go to `<file>.partial`
and are renamed into place after the check, so a crash, Ctrl-C or bad chunk leaves nothing a
later run could mistake for a good model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tqdm import tqdm

from pice.shared.errors import ChecksumMismatchError
from pice.shared.models.cache import file_lock, gguf_dir, stage
from pice.shared.models.registry import PackagedModel

_BLOCK = 8 << 20  # large reads keep hashing I/O-bound without holding much memory
MARKER_SUFFIX = ".sha256"


def _progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled
    )


def sha256_file(path: Path, progress: bool = True) -> str:
    """Hex sha256 of a file, read in blocks, with an optional byte progress bar."""
    digest = hashlib.sha256()
    with (
        stage("verify sha256 of", path.name, path.stat().st_size),
        open(path, "rb") as src,
        _progress_bar(path.stat().st_size, f"sha256 {path.name}", progress) as bar,
    ):
        while block := src.read(_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def gguf_path(model: PackagedModel, cache_dir: Path) -> Path:
    """Where `assemble_gguf` puts (or has put) the model's GGUF."""
    return gguf_dir(cache_dir) / model.gguf_filename


def marker_path(final: Path) -> Path:
    return final.with_name(final.name + MARKER_SUFFIX)


def read_marker(final: Path) -> str | None:
    """The digest recorded by the last successful verification of `final`, if any."""
    try:
        text = marker_path(final).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    fields = text.split()
    return fields[0].lower() if fields else None


def _write_marker(final: Path, digest: str) -> None:
    # sha256sum format, so `sha256sum -c` can check the file by hand.
    marker = marker_path(final)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(f"{digest}  {final.name}\n", encoding="ascii")
    os.replace(tmp, marker)


def _discard(final: Path) -> None:
    marker_path(final).unlink(missing_ok=True)
    final.unlink(missing_ok=True)


def _mismatch(final: Path, expected: str, actual: str, what: str) -> ChecksumMismatchError:
    return ChecksumMismatchError(
        f"{what} {final} has sha256 {actual}, expected {expected}; the file was deleted"
    )


def assemble_gguf(
    model: PackagedModel, cache_dir: Path, progress: bool = True, *, verify: bool = False
) -> Path:
    """Return the path of the model's verified GGUF, assembling it from its chunks if needed.

    An existing file is trusted when its marker records the expected digest, unless `verify`
    asks for a re-hash. A file that fails that re-hash is deleted: with `verify` the mismatch is
    raised (the caller asked whether the file on disk is good); without it the file is rebuilt
    from the chunks. Raises ChecksumMismatchError when the chunks themselves hash wrong.
    """
    final = gguf_path(model, cache_dir)
    expected = model.sha256.lower()
    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir, model.gguf_filename):
        if final.is_file():
            if not verify and read_marker(final) == expected:
                return final
            actual = sha256_file(final, progress)
            if actual == expected:
                _write_marker(final, actual)
                return final
            _discard(final)
            if verify:
                raise _mismatch(final, expected, actual, "assembled GGUF")
        _assemble(model, final, expected, progress)
    return final


def _assemble(model: PackagedModel, final: Path, expected: str, progress: bool) -> None:
    chunks = model.chunk_paths()
    partial = final.with_name(final.name + ".partial")
    total = sum(c.stat().st_size for c in chunks)
    digest = hashlib.sha256()
    try:
        with (
            stage(f"assemble {model.alias} from {len(chunks)} chunks into", str(final), total),
            open(partial, "wb") as out,
            _progress_bar(total, f"assemble {model.alias}", progress) as bar,
        ):
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
            out.flush()
            # Durable before the rename, or a power cut could publish a renamed-but-empty file.
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != expected:
            raise _mismatch(final, expected, actual, f"GGUF assembled from {len(chunks)} chunks")
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _write_marker(final, actual)
