"""Every quantized format: the torch reference against the gguf package's own dequantisation,
the C++ kernels (every backend this CPU has, plus the portable one) against the torch reference
— exactly for dequantisation, to float rounding for the GEMV/GEMM given the same int8
activations the kernel uses, and within the activation-quantization error against fp32."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from pice.kernels import quant as quant_module
from pice.kernels.quant import Fmt, dequantize, quantize, row_bytes
from pice.kernels.quant_linear import (
    QuantEmbedding,
    QuantLinear,
    QuantWeight,
    load_quant_kernel,
)

ALL = [Fmt.Q4_0, Fmt.Q5_0, Fmt.Q8_0, Fmt.Q4_K, Fmt.Q5_K, Fmt.Q6_K, Fmt.F16, Fmt.BF16]
K_QUANTS = (Fmt.Q4_K, Fmt.Q5_K, Fmt.Q6_K)
kernel = load_quant_kernel()
needs_kernel = pytest.mark.skipif(kernel is None, reason="quant kernels not buildable here")
BACKENDS = ["portable"] + ([kernel.backend()] if kernel and kernel.backend() != "portable" else [])


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    assert kernel is not None
    best = kernel.backend()
    kernel.set_backend(request.param)
    yield request.param
    kernel.set_backend(best)


def weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0, :7] *= 20  # an outlier per block exercises the scales
    return w


@pytest.mark.parametrize("fmt", [Fmt.Q4_0, Fmt.Q5_0, Fmt.Q8_0, Fmt.F16, Fmt.BF16])
def test_reference_matches_gguf_package(fmt: Fmt) -> None:
    w = weights(6, 256, 1).numpy()
    q = quants.quantize(w, GGMLQuantizationType(int(fmt)))
    want = quants.dequantize(q, GGMLQuantizationType(int(fmt)))
    data = torch.from_numpy(np.ascontiguousarray(q).view(np.uint8).reshape(6, -1))
    torch.testing.assert_close(dequantize(data, fmt, 256), torch.from_numpy(want), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ALL)
def test_quantizer_round_trip_and_gguf_reads_it(fmt: Fmt) -> None:
    w = weights(5, 512, 2)
    q = quantize(w, fmt)
    assert q.shape == (5, row_bytes(fmt, 512)) and q.dtype == torch.uint8
    ours = dequantize(q, fmt, 512)
    theirs = quants.dequantize(q.numpy(), GGMLQuantizationType(int(fmt)))  # K-quants too
    torch.testing.assert_close(ours, torch.from_numpy(np.asarray(theirs)).reshape(5, 512),
                               rtol=0, atol=0)
    step = {Fmt.Q4_0: 1 / 8, Fmt.Q4_K: 1 / 15, Fmt.Q5_0: 1 / 16, Fmt.Q5_K: 1 / 31,
            Fmt.Q6_K: 1 / 32, Fmt.Q8_0: 1 / 127, Fmt.F16: 1e-3, Fmt.BF16: 1e-2}[fmt]
    block = w[1:].reshape(-1, 32)  # rows without the outlier: error per block within a step
    err = (ours[1:].reshape(-1, 32) - block).abs().amax(1)
    assert bool((err <= 2.2 * step * block.abs().amax(1) + 1e-6).all())


@needs_kernel
@pytest.mark.parametrize("fmt", ALL)
def test_kernel_dequantize_is_exact(fmt: Fmt) -> None:
    q = quantize(weights(7, 512, 3), fmt)
    torch.testing.assert_close(kernel.dequantize(q, int(fmt), 512), dequantize(q, fmt, 512),
                               rtol=0, atol=0)
    ids = torch.tensor([6, 0, 3, 3])
    emb = QuantEmbedding(QuantWeight(q, fmt, 512))
    torch.testing.assert_close(emb(ids), dequantize(q, fmt, 512)[ids], rtol=0, atol=0)


def quantized_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """What the kernel multiplies by: x rounded to int8 per block (scale amax / 127)."""
    b = x.reshape(x.shape[0], -1, block)
    amax = b.abs().amax(2, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, 0)
    return (torch.round(b * inv) * (amax / 127)).reshape(x.shape)


@needs_kernel
@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 32, 39, 300])
def test_kernel_matmul_matches_reference(fmt: Fmt, rows: int, backend: str) -> None:
    k = 768 if fmt in K_QUANTS else 352
    q = quantize(weights(45, k, 4), fmt)
    w = dequantize(q, fmt, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    got = QuantLinear([QuantWeight(q, fmt, k)])(x)
    exact = x @ w.T
    if backend == "portable" or fmt in (Fmt.F16, Fmt.BF16):
        torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-3)  # fp32 activations
        return
    # the SIMD kernels use int8 activations: same numbers up to float summation order ...
    xq = quantized_activations(x, 256 if fmt in K_QUANTS else 32)
    torch.testing.assert_close(got, xq @ w.T, rtol=1e-4, atol=2e-3)
    # ... and close to the fp32 product
    assert float((got - exact).abs().max()) <= 0.02 * float(exact.abs().max())


@needs_kernel
@pytest.mark.parametrize("fmt", ALL)
def test_a_row_is_bitwise_the_same_in_any_batch(fmt: Fmt, backend: str) -> None:
    """Per-row activation scales and one path for every row count: a row's output does not
    depend on the other rows (the prefill-sized batches included)."""
    k = 4864 if fmt in K_QUANTS else 896  # row tiles of a few rows, as real models get
    w = QuantLinear([QuantWeight(quantize(weights(24, k, 9), fmt), fmt, k)])
    x = torch.randn(90, k, generator=torch.Generator().manual_seed(3))
    x[5] *= 1000  # a large row must not change its neighbours' scales
    alone = torch.cat([w(x[i:i + 1]) for i in range(x.shape[0])])
    for rows in (2, 3, 9, 33, 90):
        assert torch.equal(w(x[:rows]), alone[:rows]), rows
    assert torch.equal(w(x[7:71]), alone[7:71])


@needs_kernel
def test_mixed_segments_and_bias(backend: str) -> None:
    """A fused projection whose parts have different formats (as GGUF q/k/v do)."""
    k = 512
    parts = [(Fmt.Q5_0, 64), (Fmt.Q4_K, 16), (Fmt.Q8_0, 16), (Fmt.Q6_K, 8)]
    segs = [QuantWeight(quantize(weights(n, k, i), f), f, k) for i, (f, n) in enumerate(parts)]
    lin = QuantLinear(segs)
    lin.set_bias(torch.randn(104))
    x = torch.randn(3, k)
    want = x @ lin.dequantized_weight().T + lin.bias
    torch.testing.assert_close(lin(x), want, rtol=0.02, atol=0.05 * float(want.abs().max()))
    assert lin.out_features == 104 and lin.nbytes() == sum(s.data.numel() for s in segs)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple"):
        row_bytes(Fmt.Q4_K, 300)
    with pytest.raises(ValueError, match="uint8"):
        QuantWeight(torch.zeros(4, 10, dtype=torch.uint8), Fmt.Q8_0, 32)


@pytest.mark.parametrize("fmt", [Fmt.Q8_0, Fmt.Q4_K, Fmt.Q6_K, Fmt.F16])
def test_large_matrices_go_in_pieces_with_the_same_result(
        fmt: Fmt, monkeypatch: pytest.MonkeyPatch) -> None:
    w = weights(37, 512, 8)
    whole_q = quantize(w, fmt)
    whole = dequantize(whole_q, fmt, 512)
    monkeypatch.setattr(quant_module, "_CHUNK", 5 * 512)  # pieces of 5 rows
    assert torch.equal(quantize(w, fmt), whole_q)
    assert torch.equal(dequantize(whole_q, fmt, 512), whole)
