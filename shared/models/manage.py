"""`pice models list|prepare|verify`: inspect and prepare the packaged models' cache."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pice.shared.errors import PiceError
from pice.shared.models.assemble import assemble_gguf, gguf_path, read_marker
from pice.shared.models.cache import default_cache_dir, models_dir
from pice.shared.models.convert import read_convert_marker
from pice.shared.models.registry import PACKAGED, PackagedModel
from pice.shared.models.resolve import prepare_packaged, resolve_model


@dataclass(frozen=True)
class ModelStatus:
    alias: str
    role: str
    size_hint: str
    packages_installed: bool
    assembled: bool  # a verified GGUF is in the cache
    converted: bool  # the transformers directory is ready to load
    path: str  # the converted directory (whether or not it exists yet)


def list_models(
    cache_dir: Path | None = None, models: Mapping[str, PackagedModel] | None = None
) -> list[ModelStatus]:
    """The state of each packaged model in the cache; cheap, imports no chunk package."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    out = []
    for model in (models if models is not None else PACKAGED).values():
        gguf = gguf_path(model, cache)
        conv = models_dir(cache) / model.alias
        marker = read_convert_marker(conv) or {}
        out.append(
            ModelStatus(
                alias=model.alias,
                role=model.role,
                size_hint=model.size_hint,
                packages_installed=model.packages_installed(),
                assembled=gguf.is_file() and read_marker(gguf) == model.sha256.lower(),
                converted=marker.get("source_sha256") == model.sha256.lower(),
                path=str(conv),
            )
        )
    return out


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _print_table(rows: list[ModelStatus], cache: Path) -> None:
    header = ("ALIAS", "ROLE", "SIZE", "PACKAGES", "ASSEMBLED", "CONVERTED")
    cells = [header] + [
        (
            r.alias,
            r.role,
            r.size_hint,
            _yes(r.packages_installed),
            _yes(r.assembled),
            _yes(r.converted),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(f"cache: {cache}")


def models_main(
    action: str,
    names: list[str],
    cache_dir: Path | None,
    models: Mapping[str, PackagedModel] | None = None,
) -> int:
    """Run one CLI action and return its exit code (0 ok, 1 a model failed, 2 usage error).

    `models` replaces the packaged registry (tests use it to point at fake chunks).
    """
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    registry = models if models is not None else PACKAGED
    if action == "list":
        _print_table(list_models(cache, registry), cache)
        return 0
    if action == "prepare":
        return _prepare(names or list(registry), cache, registry)
    if action == "verify":
        return _verify(names or list(registry), cache, registry)
    print(f"unknown action {action!r}; expected list, prepare or verify", file=sys.stderr)
    return 2


def _prepare(names: list[str], cache: Path, registry: Mapping[str, PackagedModel]) -> int:
    failed = 0
    for name in names:
        start = time.perf_counter()
        try:
            if name in registry:
                resolved = prepare_packaged(registry[name], cache)
            else:
                # Beyond the aliases, anything resolve_model accepts (e.g. a local .gguf).
                resolved = resolve_model(name, cache)
        except PiceError as exc:
            print(f"FAILED {name}: {exc.message}", file=sys.stderr)
            failed += 1
            continue
        took = time.perf_counter() - start
        print(f"ready  {name}: {resolved.path} ({resolved.source}, {took:.1f}s)")
    return 1 if failed else 0


def _verify(names: list[str], cache: Path, registry: Mapping[str, PackagedModel]) -> int:
    failed = 0
    for name in names:
        model = registry.get(name)
        if model is None:
            print(f"FAILED {name}: not a packaged alias ({', '.join(registry)})", file=sys.stderr)
            failed += 1
            continue
        try:
            path = assemble_gguf(model, cache, progress=True, verify=True)
        except PiceError as exc:
            print(f"FAILED {name}: {exc.message}")
            failed += 1
            continue
        print(f"OK     {name}: sha256 {read_marker(path)}  {path}")
    return 1 if failed else 0
