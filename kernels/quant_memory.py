"""Zero-filled CPU tensors whose memory is mapped only where written: a large pool (the KV
cache, LoRA slot buffers padded to the maximum rank) costs resident memory as it fills, not up
front. numpy's zeros is calloc, which takes fresh zero pages from the kernel for large sizes;
torch.zeros would write every page."""

from __future__ import annotations

import numpy as np
import torch

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def zeros_lazy(shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.zeros(shape, dtype, device), lazily committed on the CPU."""
    if torch.device(device).type != "cpu" or dtype not in _NUMPY:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.zeros(shape, dtype=_NUMPY[dtype])).view(dtype)
