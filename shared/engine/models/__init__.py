"""Pure-torch decoder implementations over the paged KV cache (Llama, Qwen2, Gemma 3 text).

`build_model(model_dir, dtype, device)` reads the HF config and safetensors weights and returns
a `CausalLM`: forward(input_ids, kv_caches, meta) -> hidden, compute_logits(hidden) -> logits."""

from pice.shared.engine.models.base import CausalLM, KVCache
from pice.shared.engine.models.gemma3 import Gemma3ForCausalLM
from pice.shared.engine.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from pice.shared.engine.models.loader import (
    ARCHITECTURES,
    MODEL_TYPES,
    build_model,
    model_class,
)

__all__ = [
    "ARCHITECTURES",
    "MODEL_TYPES",
    "CausalLM",
    "Gemma3ForCausalLM",
    "KVCache",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "build_model",
    "model_class",
]
