"""Gemma 3 (text-only, Gemma3ForCausalLM / model_type "gemma3_text").

Differences from Llama, all mirrored from transformers' modeling_gemma3:
- embeddings are multiplied by sqrt(hidden), the factor rounded to the embedding dtype first;
- RMSNorm scales by (1 + weight), in float32; per-head q_norm/k_norm before the rotary embedding;
- "sandwich" norms: post-attention and pre/post-feedforward norms around each sub-block;
- GELU-tanh gated MLP; attention scale query_pre_attn_scalar ** -0.5 (not head_dim ** -0.5);
- sliding-window layers use their own rope theta (local base 10k) and no rope scaling, global
  layers use rope_theta (and rope scaling, when the config has one);
- optional tanh soft-capping of the final logits."""

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
from pice.shared.engine.models.layers import Attention, GatedMLP, GemmaRMSNorm
from pice.shared.engine.models.rope import RotaryCache, inv_freq_of
from pice.shared.errors import UnsupportedModelError


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: Any, sliding_window: int | None) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        bias = bool(getattr(config, "attention_bias", False))
        self.self_attn = Attention(h, config.num_attention_heads, config.num_key_value_heads,
                                   head_dim_of(config), config.query_pre_attn_scalar ** -0.5,
                                   sliding_window, qkv_bias=bias, o_bias=bias, qk_norm_eps=eps)
        self.mlp = GatedMLP(h, config.intermediate_size, config.hidden_activation)
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        # x: [num_tokens, hidden]
        attn = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        x = x + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(mlp)


class Gemma3Model(nn.Module):
    def __init__(self, config: Any, windows: list[int | None]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, w) for w in windows)
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3ForCausalLM(CausalLM):
    model: Gemma3Model

    def __init__(self, config: Any) -> None:
        super().__init__()
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError("bidirectional Gemma 3 (embedding models) is unsupported")
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise UnsupportedModelError("attention logit soft-capping is not supported")
        self.set_shape(config, tie_default=True)
        cap = getattr(config, "final_logit_softcapping", None)
        self.final_logit_softcapping: float | None = None if cap is None else float(cap)
        self.hidden_size = int(config.hidden_size)
        self.model = Gemma3Model(config, self.sliding_windows)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # One cos/sin table per layer type (local vs global theta); layer i uses
        # self.rotaries[self.rope_index[i]].
        kinds = ["sliding_attention" if w else "full_attention" for w in self.sliding_windows]
        types = sorted(set(kinds))
        self.rotaries = [RotaryCache(inv_freq_of(rope_params_of(config, t), self.head_dim,
                                                 self.max_position_embeddings)) for t in types]
        self.rope_index = [types.index(k) for k in kinds]

    def forward(self, input_ids: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        emb = self.model.embed_tokens(input_ids)  # [num_tokens, hidden]
        x = emb * self._embed_scale(emb.dtype)
        max_len = max(meta.context_lens)
        # Per rope table: cos, sin [num_tokens, head_dim // 2], gathered once for all layers
        tables = [r.lookup(meta.positions, max_len, x.dtype) for r in self.rotaries]
        for i, (layer, kv_cache) in enumerate(zip(self.model.layers, kv_caches, strict=True)):
            cos, sin = tables[self.rope_index[i]]
            x = layer(x, cos, sin, kv_cache, meta)
        return self.model.norm(x)

    def _embed_scale(self, dtype: torch.dtype) -> float:
        # sqrt(hidden) rounded to the embedding dtype first, as transformers does
        # (sqrt(3072) = 55.4256 becomes 55.5 in bfloat16).
        return float(torch.tensor(self.hidden_size ** 0.5, dtype=torch.float32).to(dtype))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()  # [n, vocab]
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits
