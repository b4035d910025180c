"""Model resolution: packaged aliases, local directories and GGUF files, hub ids.

`resolve_model(spec)` is the entry point: it returns a path (or hub id) for `from_pretrained`,
assembling and converting packaged GGUF models into the cache on first use.
"""

from pice.shared.models.assemble import assemble_gguf, sha256_file
from pice.shared.models.cache import default_cache_dir
from pice.shared.models.convert import convert_gguf
from pice.shared.models.manage import ModelStatus, list_models, models_main
from pice.shared.models.registry import (
    DEFAULT_CLOUD_MODEL,
    DEFAULT_EDGE_MODEL,
    PACKAGED,
    PackagedModel,
)
from pice.shared.models.resolve import ResolvedModel, resolve_model

__all__ = [
    "DEFAULT_CLOUD_MODEL",
    "DEFAULT_EDGE_MODEL",
    "PACKAGED",
    "ModelStatus",
    "PackagedModel",
    "ResolvedModel",
    "assemble_gguf",
    "convert_gguf",
    "default_cache_dir",
    "list_models",
    "models_main",
    "resolve_model",
    "sha256_file",
]
