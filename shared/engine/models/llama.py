"""Llama and Qwen2: one implementation, parametrized by the bias flags.

Qwen2 = Llama with a bias on q/k/v (never on o or the MLP) and optional sliding-window layers;
Llama takes `attention_bias` (q/k/v/o) and `mlp_bias` from its config, plus llama3 rope scaling."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pice.kernels.paged_attention import AttentionMetadata
from pice.shared.engine.models.base import (
    CausalLM,
    KVCache,
    head_dim_of,
    rope_params_of,
)
from pice.shared.engine.models.layers import Attention, GatedMLP, RMSNorm
from pice.shared.engine.models.rope import RotaryCache, inv_freq_of


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, sliding_window: int | None, qkv_bias: bool, o_bias: bool,
                 mlp_bias: bool) -> None:
        super().__init__()
        hd = head_dim_of(config)
        self.self_attn = Attention(config.hidden_size, config.num_attention_heads,
                                   config.num_key_value_heads, hd, hd ** -0.5, sliding_window,
                                   qkv_bias=qkv_bias, o_bias=o_bias)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            bias=mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        # x: [num_tokens, hidden] (pre-norm residual stream)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: Any, windows: list[int | None], qkv_bias: bool, o_bias: bool,
                 mlp_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, w, qkv_bias, o_bias, mlp_bias) for w in windows)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    """LlamaForCausalLM; subclasses change only the bias flags (see Qwen2ForCausalLM)."""

    model: LlamaModel

    def __init__(self, config: Any) -> None:
        super().__init__()
        qkv_bias, o_bias, mlp_bias = self.bias_flags(config)
        self.set_shape(config, tie_default=False)
        self.model = LlamaModel(config, self.sliding_windows, qkv_bias, o_bias, mlp_bias)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq = inv_freq_of(rope_params_of(config), self.head_dim, self.max_position_embeddings)
        self.rotary = RotaryCache(inv_freq)  # one theta for every layer

    @staticmethod
    def bias_flags(config: Any) -> tuple[bool, bool, bool]:
        """(q/k/v bias, o bias, MLP bias)."""
        attn = bool(getattr(config, "attention_bias", False))
        return attn, attn, bool(getattr(config, "mlp_bias", False))

    def forward(self, input_ids: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [num_tokens, hidden]
        # cos, sin: [num_tokens, head_dim // 2], gathered once for all layers
        cos, sin = self.rotary.lookup(meta.positions, max(meta.context_lens), x.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [n, vocab]


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def bias_flags(config: Any) -> tuple[bool, bool, bool]:
        return True, False, False
