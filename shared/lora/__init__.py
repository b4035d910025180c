"""Multi-LoRA serving: PEFT adapters validated before loading (`adapter`), and the adapter pool
over device slots, host RAM and disk (`pool`)."""

from pice.shared.lora.adapter import (
    AdapterInfo,
    AdapterSpec,
    LoadedAdapter,
    ModelShape,
    load_adapter,
    validate_adapter,
)
from pice.shared.lora.pool import AdapterPool

__all__ = [
    "AdapterInfo",
    "AdapterPool",
    "AdapterSpec",
    "LoadedAdapter",
    "ModelShape",
    "load_adapter",
    "validate_adapter",
]
