"""Row-independent CPU kernels (csrc/rowwise.cpp): attention that computes every query over its
own keys only, and the gated MLP activation row by row. With them, and with the linear kernels
(cpu_linear.py, quant_linear.py) that take one path for every row count, a request's greedy
tokens do not depend on which other requests share its steps. Built on first use and cached;
where they cannot be built torch's ops run instead (correct, not batch-invariant; logged once)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "rowwise.cpp"
# activation name (config.hidden_act) -> the kernel's code
ACT_CODES = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "gelu_tanh": 2}


@functools.cache
def rowwise_kernel() -> Any | None:
    """The compiled extension, or None where it cannot be built here."""
    try:
        from pice.kernels.build import load_extension

        return load_extension("pice_rowwise", sources=[str(_SOURCE)],
                              extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                              verbose=False)
    except Exception as exc:  # no compiler / headers: torch's ops
        log.warning("rowwise: could not build the kernels (%s); using torch's attention and "
                    "activations (results may then depend on the batch)", exc)
        return None


def gated_activation(gate_up: torch.Tensor, act: str) -> torch.Tensor | None:
    """act(gate) * up for gate_up [M, 2I] -> [M, I], row by row; None where the kernel does not
    apply (no kernel, not float32 on the CPU, an activation it does not know)."""
    kernel = rowwise_kernel()
    if (kernel is None or gate_up.device.type != "cpu" or gate_up.dtype != torch.float32
            or gate_up.dim() != 2 or act not in ACT_CODES):
        return None
    out: torch.Tensor = kernel.gated_act(gate_up, ACT_CODES[act])
    return out
