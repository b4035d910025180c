"""The part of a model one stage of an edge group runs: decoder layers [start, end), plus the token
embedding on the first stage and the final norm + LM head on the last, with a paged KV cache (the
engine's BlockManager) for its own layers only. Only those weights are read from the checkpoint,
so a stage's memory is its share of the model.

The model classes are pice's own (shared/engine/models); their `forward` runs every layer, so
this module drives the parts itself: embed (times Gemma's scale), one rope table per layer type,
each kept layer, then norm and `compute_logits`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from pice.edge.group.wire import Fwd
from pice.kernels.cpu_linear import use_cpu_kernels
from pice.kernels.paged_attention import build_metadata
from pice.shared.engine.block_manager import BlockManager
from pice.shared.engine.models import CausalLM, model_class
from pice.shared.engine.models.loader import _expected_keys, _fused_target
from pice.shared.engine.sampler import sample
from pice.shared.engine.sequence import Sequence
from pice.shared.errors import PiceError, UnsupportedModelError
from pice.shared.sampling import SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class StageError(PiceError):
    """A frame that this stage cannot apply (K/V out of step, pool exhausted)."""


class StageKV:
    """Paged K/V of this stage's layers, one block table per sequence in flight."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching=False)
        self.seqs: dict[int, Sequence] = {}  # seq_id → placeholder tokens (one per position)

    def prepare(self, f: Fwd) -> Sequence:
        """Room for the frame's new tokens; the sequence (its block table and length)."""
        if f.new:
            self.free(f.seq_id)
        seq = self.seqs.get(f.seq_id)
        if seq is None:
            if f.start != 0:
                raise StageError(f"seq {f.seq_id} continues at {f.start} but this stage holds "
                                 "none of it")
            params = SamplingParams(max_tokens=1, temperature=f.temperature, top_p=f.top_p,
                                    top_k=f.top_k, seed=f.seed)
            seq = Sequence([0] * f.q_len, params)
            if not self.blocks.can_allocate(seq):
                raise StageError(f"KV pool full: seq {f.seq_id} needs "
                                 f"{self.blocks.blocks_for(f.q_len)} blocks")
            self.blocks.allocate(seq)
            self.seqs[f.seq_id] = seq
            return seq
        if len(seq) != f.start or f.q_len != 1:
            raise StageError(f"seq {f.seq_id}: frame at {f.start}+{f.q_len}, stage holds "
                             f"{len(seq)} tokens")
        seq.token_ids.append(0)
        if not self.blocks.can_append(seq):
            raise StageError(f"KV pool full: seq {f.seq_id} needs one more block")
        self.blocks.append_slot(seq)
        return seq

    def free(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None:
            self.blocks.deallocate(seq)

    def clear(self) -> None:
        for seq_id in list(self.seqs):
            self.free(seq_id)


class StagePart:
    def __init__(self, model_dir: str | Path, start: int, end: int, embed: bool, head: bool,
                 num_blocks: int, block_size: int = 16, dtype: str = "float32",
                 cpu_kernels: bool = True) -> None:
        from transformers import AutoConfig  # lazy: slow to import

        model_dir = Path(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = model_class(model_dir)(config)
        if not 0 <= start < end <= model.num_layers:
            raise UnsupportedModelError(f"layer range [{start}, {end}) outside the model's "
                                        f"{model.num_layers} layers")
        self.start, self.end, self.embed, self.head = start, end, embed, head
        self.dtype = _DTYPES[dtype]
        trunk: Any = model.model  # embed_tokens, layers, norm
        trunk.layers = nn.ModuleList(list(trunk.layers)[start:end])
        if not (embed or (head and model.tie_word_embeddings)):
            trunk.embed_tokens = None
        if not head:
            trunk.norm = None
            model.lm_head = None  # type: ignore[assignment]
        model = model.to(dtype=self.dtype).to_empty(device="cpu")
        if head:
            model.tie_weights()
        self._load(model, sorted(model_dir.glob("*.safetensors")))
        model = model.eval().requires_grad_(False)
        if cpu_kernels and self.dtype == torch.float32:
            use_cpu_kernels(model)  # as the engine's ModelRunner does, so the math matches
        self.model: CausalLM = model
        self.width = int(config.hidden_size)
        self.block_size = block_size
        # the rope tables: Gemma 3 has one per layer type, Llama/Qwen one for every layer
        self.rotaries = getattr(model, "rotaries", None) or [model.rotary]
        self.rope_index: list[int] = getattr(model, "rope_index", None) or \
            [0] * model.num_layers
        shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
        # kv[j] = (k, v) of local layer j, each [num_blocks, block_size, kv_heads, head_dim]
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype),
                           torch.zeros(shape, dtype=self.dtype)) for _ in range(end - start)]
        self.trunk: Any = model.model
        self.kv = StageKV(num_blocks, block_size)

    def _load(self, model: CausalLM, files: list[Path]) -> None:
        """Copy this stage's tensors only (renumbering its layers from 0)."""
        if not files:
            raise UnsupportedModelError("no *.safetensors weights")
        params = dict(model.named_parameters())
        keep_embed = getattr(model.model, "embed_tokens", None) is not None
        seen: set[str] = set()
        with torch.no_grad():
            for file in files:
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                        local = self._local_name(name, keep_embed, model.tie_word_embeddings)
                        if local is None:
                            continue
                        target = _fused_target(model, local) if local not in params else None
                        if target is not None:
                            param, offset, rows, key = target
                            dest = param.narrow(0, offset, rows)
                        elif local in params:
                            dest, key = params[local], local
                        else:
                            raise UnsupportedModelError(f"unexpected weight {name}")
                        tensor = f.get_tensor(name)
                        if tensor.shape != dest.shape:
                            raise UnsupportedModelError(f"weight {name} has shape "
                                                        f"{tuple(tensor.shape)}, expected "
                                                        f"{tuple(dest.shape)}")
                        dest.copy_(tensor)
                        seen.add(key)
        missing = sorted(_expected_keys(model) - seen)
        if missing:
            raise UnsupportedModelError(f"weights missing from checkpoint: {missing[:5]}")

    def _local_name(self, name: str, keep_embed: bool, tied: bool) -> str | None:
        m = _LAYER.match(name)
        if m:
            i = int(m.group(1))
            return f"model.layers.{i - self.start}.{m.group(2)}" \
                if self.start <= i < self.end else None
        if name == "model.embed_tokens.weight":
            return name if keep_embed else None
        if name == "model.norm.weight":
            return name if self.head else None
        if name == "lm_head.weight":
            return name if self.head and not tied else None
        return None if name.endswith("rotary_emb.inv_freq") else name

    @torch.inference_mode()
    def forward(self, fwd: list[Fwd], x: torch.Tensor) -> torch.Tensor:
        """x: token ids [n_tokens] (first stage) or hidden [n_tokens, width] -> this stage's
        output hidden [n_tokens, width]. Grows each sequence's K/V by its new tokens."""
        seqs = [self.kv.prepare(f) for f in fwd]
        meta = build_metadata([s.block_table for s in seqs], [len(s) for s in seqs],
                              [f.q_len for f in fwd], self.block_size, torch.device("cpu"))
        if self.embed:
            x = self.trunk.embed_tokens(x)  # [n_tokens, width]
            scale = getattr(self.model, "_embed_scale", None)
            if scale is not None:
                x = x * scale(x.dtype)
        else:
            x = x.to(self.dtype)
        max_len = max(meta.context_lens)
        # per rope table: cos, sin [n_tokens, head_dim // 2]
        tables = [r.lookup(meta.positions, max_len, x.dtype) for r in self.rotaries]
        for j, layer in enumerate(self.trunk.layers):
            cos, sin = tables[self.rope_index[self.start + j]]
            x = layer(x, cos, sin, self.kv_caches[j], meta)
        return x

    @torch.inference_mode()
    def sample(self, fwd: list[Fwd], hidden: torch.Tensor,
               end_ids: tuple[int, ...] = ()) -> list[tuple[int, int, float]]:
        """Last stage: (seq_id, token, logprob) from each sequence's last position. `end_ids`
        (the model's EOS ids) cannot be sampled for a record that holds the end."""
        last = torch.tensor([f.q_len for f in fwd]).cumsum(0) - 1  # [batch]
        h = self.trunk.norm(hidden[last])  # [batch, width]
        logits = self.model.compute_logits(h).float()  # [batch, vocab]
        seqs = [self.kv.seqs[f.seq_id] for f in fwd]
        vocab = logits.shape[-1]
        ends = tuple(t for t in end_ids if 0 <= t < vocab)
        ids, lps = sample(logits, seqs, [ends if f.hold_end else () for f in fwd])
        return [(f.seq_id, t, lp) for f, t, lp in zip(fwd, ids, lps, strict=True)]


def describe(part: StagePart) -> dict[str, Any]:
    return {"start": part.start, "end": part.end, "embed": part.embed, "head": part.head,
            "params": sum(p.numel() for p in part.model.parameters())}
