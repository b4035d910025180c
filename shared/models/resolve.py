"""Map a user's model spec to something `from_pretrained` can load.

Accepted specs, tried in this order: a packaged alias, an existing local path (a transformers
directory or a `.gguf` file), a hub id `owner/name`. Hub ids are passed through untouched:
downloading is transformers' job, and doing it here would hide its caching and auth options.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pice.shared.errors import ModelNotFoundError, UnsupportedModelError
from pice.shared.models.assemble import assemble_gguf, sha256_file
from pice.shared.models.cache import default_cache_dir, file_lock, models_dir
from pice.shared.models.convert import convert_gguf, read_convert_marker
from pice.shared.models.registry import PACKAGED, PackagedModel

# One slash, hub-legal characters, no leading dot/slash: "./x/y" and "/x/y" stay paths.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ResolvedModel:
    spec: str
    path: str  # local dir or hub id to pass to from_pretrained
    source: str  # "packaged" | "local-dir" | "gguf" | "hub"
    gguf: str | None = None  # the verified GGUF the model came from (the engine's weights)


def _not_found(spec: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {spec!r} not found: {why}. Use a packaged alias ({', '.join(PACKAGED)}), "
        "a local directory with config.json, a local .gguf file, or a hub id owner/name"
    )


def resolve_model(spec: str, cache_dir: Path | None = None, progress: bool = True,
                  dense: bool = True) -> ResolvedModel:
    """Resolve `spec`, preparing (assembling and converting) packaged models and GGUF files.

    For a GGUF-based model, `dense=False` asks only for what the engine needs beside the GGUF
    (config and tokenizer): no fp32 weights are made. A dense directory already converted is
    used either way, since it has those files too."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    spec = spec.strip()
    if not spec:
        raise _not_found(spec, "the spec is empty")
    if spec in PACKAGED:
        return prepare_packaged(PACKAGED[spec], cache, progress, dense)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _not_found(spec, f"directory {path} has no config.json")
        return ResolvedModel(spec, str(path.resolve()), "local-dir")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UnsupportedModelError(
                f"model file {path} is not a .gguf file; pass a directory with config.json"
            )
        return _prepare_gguf(spec, path.resolve(), cache, progress, dense)
    if _HUB_ID.match(spec):
        return ResolvedModel(spec, spec, "hub")
    raise _not_found(spec, "no such alias, path or hub id")


META_SUFFIX = "+meta"  # a directory with config and tokenizer only: weights stay in the GGUF


def prepare_packaged(model: PackagedModel, cache_dir: Path, progress: bool = True,
                     dense: bool = True) -> ResolvedModel:
    """Assemble and convert a packaged model into `<cache>/models/<alias>/` (idempotent);
    with `dense=False`, only its config and tokenizer into `<alias>+meta/` unless the dense
    directory exists already."""
    dense_dir = models_dir(cache_dir) / model.alias
    out_dir = dense_dir
    if not dense and not _converted_from(dense_dir, model.sha256):
        out_dir = models_dir(cache_dir) / (model.alias + META_SUFFIX)
    if not _converted_from(out_dir, model.sha256):
        with file_lock(cache_dir, model.alias):
            if not _converted_from(out_dir, model.sha256):
                gguf = assemble_gguf(model, cache_dir, progress)
                _drop_stale(out_dir)
                convert_gguf(gguf, out_dir, sha256=model.sha256, progress=progress,
                             weights=out_dir == dense_dir)
    # the marker makes this fast when the GGUF is in place; a deleted one is reassembled
    gguf = assemble_gguf(model, cache_dir, progress)
    return ResolvedModel(model.alias, str(out_dir), "packaged", str(gguf))


def _prepare_gguf(spec: str, gguf: Path, cache_dir: Path, progress: bool,
                  dense: bool = True) -> ResolvedModel:
    # Keyed by content, not path, so a moved or renamed file reuses its conversion and an
    # overwritten one gets a fresh one.
    digest = sha256_file(gguf, progress)
    name = f"gguf-{digest[:16]}"
    if not dense and not _converted_from(models_dir(cache_dir) / name, digest):
        name += META_SUFFIX
    with file_lock(cache_dir, name):
        out_dir = convert_gguf(gguf, models_dir(cache_dir) / name, sha256=digest,
                               progress=progress, weights=not name.endswith(META_SUFFIX))
    return ResolvedModel(spec, str(out_dir), "gguf", str(gguf))


def _converted_from(out_dir: Path, sha256: str) -> bool:
    marker = read_convert_marker(out_dir)
    return marker is not None and marker.get("source_sha256") == sha256.lower()


def _drop_stale(out_dir: Path) -> None:
    """Remove a conversion of an older GGUF (the registry's digest changed since)."""
    if read_convert_marker(out_dir) is not None:
        shutil.rmtree(out_dir)
