"""Engine configuration: one dataclass, validated with messages that carry the bad value."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EngineConfig:
    model: str  # local HF directory with config.json + safetensors (resolved beforehand)
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_gb: float = 1.0  # memory for the KV cache pool (sets the number of blocks)
    num_blocks: int = 0  # explicit pool size; 0 → from kv_cache_gb
    max_num_seqs: int = 32  # sequences per step
    max_num_batched_tokens: int = 4096  # tokens per step (prefill budget)
    max_model_len: int = 4096  # prompt + completion per sequence
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    # weights: None = auto (the GGUF's own quantized tensors when `gguf` is set, else float
    # `dtype`) | "none" (float, even from a GGUF) | "gguf" | "int8" / "int4" (weight-only, per
    # 32 values one scale, quantized on load); quantized weights run on the CPU only
    quantization: str | None = None
    gguf: str | None = None  # GGUF file with the weights (`model` then needs config + tokenizer)
    kv_cache_dtype: str = "auto"  # auto (float16 with quantized weights, else dtype) | a dtype
    prefix_caching: bool = True
    cpu_kernels: bool = True  # fp32 CPU decode through pice's AVX2 linear kernel (if it builds)
    device: str = "auto"  # auto (cuda when present, else cpu) | cpu | cuda | cuda:N
    lora_max_rank: int = 64  # largest LoRA rank accepted; slots are padded to it
    lora_slots: int = 8  # adapters resident on the compute device at once
    lora_host_gb: float = 2.0  # host-RAM tier for adapters read from disk (LRU)

    def __post_init__(self) -> None:
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            self.dtype = "float32" if self.device == "cpu" else "bfloat16"
        checks = [
            (self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size must be a power of 2 "
             f"in [1, 128], got {self.block_size}"),
            (self.kv_cache_gb > 0, f"kv_cache_gb must be > 0, got {self.kv_cache_gb}"),
            (self.num_blocks >= 0, f"num_blocks must be >= 0, got {self.num_blocks}"),
            (self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}"),
            (self.max_model_len >= 2, f"max_model_len must be >= 2, got {self.max_model_len}"),
            (self.max_num_batched_tokens >= self.max_model_len,
             f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len "
             f"({self.max_model_len}) so that any admitted prompt fits one step"),
            (self.dtype in ("float32", "bfloat16", "float16"),
             f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}"),
            (self.quantization in (None, "none", "gguf", "int8", "int4"),
             "quantization must be None, 'none', 'gguf', 'int8' or 'int4', "
             f"got {self.quantization!r}"),
            (self.quantization != "gguf" or self.gguf is not None,
             "quantization 'gguf' needs a GGUF file (gguf=...)"),
            (self.kv_cache_dtype in ("auto", "float32", "bfloat16", "float16"),
             "kv_cache_dtype must be auto, float32, bfloat16 or float16, "
             f"got {self.kv_cache_dtype!r}"),
            (1 <= self.lora_max_rank <= 128,
             f"lora_max_rank must be in [1, 128], got {self.lora_max_rank}"),
            (1 <= self.lora_slots <= 4096,
             f"lora_slots must be in [1, 4096], got {self.lora_slots}"),
            (self.lora_host_gb > 0, f"lora_host_gb must be > 0, got {self.lora_host_gb}"),
            (self.weight_format == "none" or self.device == "cpu",
             f"quantized weights run on the CPU only, not on {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.kv_cache_dtype == "auto":
            self.kv_cache_dtype = "float16" if self.weight_format != "none" else self.dtype

    @property
    def weight_format(self) -> str:
        """What the weights are in memory: none (float dtype) | gguf | int8 | int4."""
        if self.quantization is None:
            return "gguf" if self.gguf is not None else "none"
        return self.quantization
