"""The distilled expansion adapters shipped with pice (package data), by base edge model."""

from __future__ import annotations

from pathlib import Path

ADAPTERS_DIR = Path(__file__).parent / "adapters"
EXPANDER_ADAPTER = "pice-expander"  # the name the runtime registers a shipped adapter under


def shipped_adapter(model_spec: str) -> Path | None:
    """The PEFT directory of the shipped expansion adapter for `model_spec`, if there is one."""
    path = ADAPTERS_DIR / model_spec
    ok = (path / "adapter_config.json").is_file() and \
        (path / "adapter_model.safetensors").is_file()
    return path if "/" not in model_spec and ok else None
