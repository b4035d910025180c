"""Edge-group helpers for tests: tiny models of each architecture, and group stages as real
processes (`python -m pice.edge.group.node_main`) on loopback, driven by JSON lines. Waits use
generous deadlines; no timing is asserted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from pice.edge.group.procs import WAIT_S, StageProc, configure

__all__ = ["WAIT_S", "StageProc", "configure", "prompts", "tiny_arch"]
_SMALL: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, vocab_size=300,
                              max_position_embeddings=512)
ARCHS = {
    "qwen2": lambda: Qwen2Config(**_SMALL, num_hidden_layers=4, tie_word_embeddings=True),
    "llama": lambda: LlamaConfig(**_SMALL, num_hidden_layers=4, tie_word_embeddings=False),
    "gemma3": lambda: Gemma3TextConfig(
        **_SMALL, num_hidden_layers=4, sliding_window=4, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"] * 2),
}


def tiny_arch(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """A tiny random model of `arch` (4 layers), every weight perturbed so that the greedy text
    varies (not one repeated token)."""
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(ARCHS[arch]()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    hf.save_pretrained(out_dir)
    return out_dir


def prompts(n: int, seed: int = 1, vocab: int = 300) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(torch.randint(5, 40, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


