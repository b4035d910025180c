"""Executes what the scheduler decided: builds the step's tensors, runs the model over the paged
KV cache, samples. Never decides anything."""

from __future__ import annotations

import logging
import resource
import time

import torch

from pice.kernels.cpu_linear import use_cpu_kernels
from pice.kernels.paged_attention import build_metadata
from pice.kernels.quant_linear import load_quant_kernel
from pice.kernels.quant_memory import zeros_lazy
from pice.kernels.rowwise import rowwise_kernel
from pice.shared.engine.config import EngineConfig
from pice.shared.engine.lora import attach_lora
from pice.shared.engine.models import build_model
from pice.shared.engine.models.quantized import step_bytes
from pice.shared.engine.sampler import sample
from pice.shared.engine.scheduler import SchedulerOutput
from pice.shared.engine.sequence import Sequence

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("pice.startup")


class ModelRunner:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.dtype = _DTYPES[cfg.dtype]
        source = cfg.gguf or cfg.model
        log.info("load %s (%s weights) ...", source, cfg.weight_format)
        t0 = time.perf_counter()
        self.model = build_model(cfg.model, dtype=self.dtype, device=self.device, gguf=cfg.gguf,
                                 quantization=cfg.weight_format)
        if self.device.type == "cpu":  # built now, in the load a user watches, not mid-request
            rowwise_kernel()
            if cfg.weight_format != "none":
                load_quant_kernel()
        if cfg.weight_format != "none":
            self.dtype = torch.float32  # activations of quantized models (norms, biases: fp32)
        elif cfg.cpu_kernels and self.device.type == "cpu" and self.dtype == torch.float32:
            use_cpu_kernels(self.model)
        kv_dtype = _DTYPES[cfg.kv_cache_dtype]
        self.lora = attach_lora(self.model)  # inert until an adapter is in a step
        m = self.model
        per_block = 2 * m.num_layers * cfg.block_size * m.num_kv_heads * m.head_dim * \
            kv_dtype.itemsize
        # never more than every sequence of a full step at the longest context can hold: a small
        # model or a short context does not pin the whole kv_cache_gb budget
        most = cfg.max_num_seqs * -(-cfg.max_model_len // cfg.block_size)
        self.num_blocks = cfg.num_blocks or max(
            1, min(most, int(cfg.kv_cache_gb * 2**30 // per_block)))
        shape = (self.num_blocks, cfg.block_size, m.num_kv_heads, m.head_dim)
        # kv_caches[layer] = (k, v), each [num_blocks, block_size, kv_heads, head_dim]
        self.kv_caches = [(self._zeros(shape, kv_dtype), self._zeros(shape, kv_dtype))
                          for _ in range(m.num_layers)]
        log.info("load %s: %.2f GB of weights read per token, done in %.1f s (peak RSS %.2f GB)",
                 source, step_bytes(self.model) / 1e9, time.perf_counter() - t0,
                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return zeros_lazy(shape, dtype, self.device)  # CPU: pages mapped as blocks fill

    def execute(self, batch: SchedulerOutput) -> tuple[list[int], list[float]]:
        """Token and log-probability per sequence, in `batch.seqs` order."""
        seqs = batch.seqs
        if not batch.is_prefill or all(s.lora_slot is None for s in seqs):
            return self._run(seqs, batch.is_prefill)
        # Prefill with adapters: order by slot so each adapter's tokens form one segment.
        slots = [-1 if s.lora_slot is None else s.lora_slot for s in seqs]
        order = sorted(range(len(seqs)), key=slots.__getitem__)
        ids, logprobs = self._run([seqs[i] for i in order], True)
        out_ids, out_lps = [0] * len(seqs), [0.0] * len(seqs)
        for k, i in enumerate(order):
            out_ids[i], out_lps[i] = ids[k], logprobs[k]
        return out_ids, out_lps

    @torch.inference_mode()
    def _run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[list[int], list[float]]:
        if is_prefill:
            query_lens = [len(s) - s.num_cached_tokens for s in seqs]
            ids = [t for s, q in zip(seqs, query_lens, strict=True) for t in s.token_ids[-q:]]
            context_lens = [len(s) for s in seqs]
        else:  # decode: the newest token of each sequence
            query_lens = [1] * len(seqs)
            ids = [s.last_token for s in seqs]
            context_lens = [len(s) for s in seqs]
        meta = build_metadata([s.block_table for s in seqs], context_lens, query_lens,
                              self.cfg.block_size, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)  # [num_tokens]
        self.lora.batch = self.lora.layout(seqs, query_lens, is_prefill, self.device)
        try:
            hidden = self.model(input_ids, self.kv_caches, meta)  # [num_tokens, hidden]
        finally:
            self.lora.batch = None
        last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1  # [batch]
        logits = self.model.compute_logits(hidden[last]).float().cpu()  # [batch, vocab]
        for s in seqs:
            s.num_cached_tokens = len(s)
        return sample(logits, seqs)
