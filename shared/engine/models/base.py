"""The interface every model implementation offers the engine, plus small config helpers.

A model sees a flat batch: the new tokens of every sequence concatenated ([num_tokens]), with
the per-step layout (slots, positions, context lengths) in `AttentionMetadata`. The paged KV
cache is owned by the engine and passed in as one (k, v) pair per layer."""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import nn

from pice.kernels.paged_attention import AttentionMetadata
from pice.shared.errors import UnsupportedModelError

KVCache = tuple[torch.Tensor, torch.Tensor]  # each [num_blocks, block_size, kv_heads, head_dim]


class CausalLM(nn.Module):
    """Decoder-only LM over a paged KV cache. Subclasses set the shape attributes in __init__."""

    # HF leaf names that live inside one fused nn.Linear of ours, e.g. "q_proj" -> ("qkv_proj", 0);
    # the weight loader copies each into its row slice (sizes from `fused_sizes` of the owner).
    fused_weights: ClassVar[dict[str, tuple[str, int]]] = {
        "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    sliding_windows: list[int | None]  # per layer; None = global attention
    tie_word_embeddings: bool
    model: nn.Module  # the decoder trunk: embed_tokens, layers, norm
    lm_head: nn.Linear

    def forward(self, input_ids: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids: [num_tokens] int64 -> final hidden states [num_tokens, hidden]."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] -> float32 logits [n, vocab]."""
        raise NotImplementedError

    def set_shape(self, config: Any, tie_default: bool) -> None:
        """The shape attributes every architecture reads the same way from its HF config."""
        self.num_layers = int(config.num_hidden_layers)
        self.num_kv_heads = int(config.num_key_value_heads)
        self.head_dim = head_dim_of(config)
        self.vocab_size = int(config.vocab_size)
        self.max_position_embeddings = int(config.max_position_embeddings)
        self.sliding_windows = sliding_windows_of(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", tie_default))

    def tie_weights(self) -> None:
        """Share the input embedding with the LM head (when the config ties them)."""
        if self.tie_word_embeddings:
            embed = cast(nn.Embedding, self.model.get_submodule("embed_tokens"))
            self.lm_head.weight = embed.weight


def head_dim_of(config: Any) -> int:
    return int(getattr(config, "head_dim", None)
               or config.hidden_size // config.num_attention_heads)


def sliding_windows_of(config: Any) -> list[int | None]:
    """Per-layer window from `layer_types` (transformers >= 4.53) or Gemma 3's older
    `sliding_window_pattern` (every pattern-th layer is global)."""
    n = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        pattern = getattr(config, "sliding_window_pattern", None)
        if pattern is None or window is None:
            types = ["full_attention"] * n
        else:
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                     for i in range(n)]
    unknown = set(types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise UnsupportedModelError(f"unsupported attention layer types {sorted(unknown)}")
    return [int(window) if t == "sliding_attention" and window else None for t in types[:n]]


def rope_params_of(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """RoPE parameters of one layer type as a flat dict with at least rope_type and rope_theta.

    transformers 5 stores them in `config.rope_parameters` (flat, or nested by layer type for
    Gemma 3); 4.x kept `rope_theta` / `rope_scaling` (and Gemma 3's `rope_local_base_freq`,
    for which the scaling never applied to local layers) as separate attributes."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        nested = layer_type is not None and isinstance(params.get(layer_type), dict)
        out = dict(params[layer_type] if nested else params)
    else:
        local = layer_type == "sliding_attention" and hasattr(config, "rope_local_base_freq")
        out = {} if local else dict(getattr(config, "rope_scaling", None) or {})
        out["rope_theta"] = config.rope_local_base_freq if local else config.rope_theta
    out["rope_type"] = out.get("rope_type", out.get("type", "default"))
    return out
