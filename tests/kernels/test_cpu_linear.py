"""The AVX2 fp32 linear against torch's, on decode and prefill shapes, and each row's result
independent of the other rows (skipped where the kernel cannot be built: then the engine keeps
torch's path, see load_kernel)."""

import pytest
import torch
from torch import nn

from pice.kernels.cpu_linear import SkinnyLinear, load_kernel, use_cpu_kernels

needs_kernel = pytest.mark.skipif(load_kernel() is None, reason="AVX2 kernel not buildable here")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 16, 77])
@pytest.mark.parametrize(("out_f", "in_f"), [(64, 32), (37, 19), (300, 896), (1, 8)])
def test_matches_torch(rows: int, out_f: int, in_f: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + out_f)
    x = torch.randn(rows, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g)
    got = load_kernel().skinny_linear(x, w)
    torch.testing.assert_close(got, x @ w.T, atol=1e-4, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("in_f", [19, 896, 4864])
def test_a_row_is_bitwise_the_same_in_any_batch(in_f: int) -> None:
    g = torch.Generator().manual_seed(in_f)
    x = torch.randn(150, in_f, generator=g)
    w = torch.randn(70, in_f, generator=g)
    kernel = load_kernel()
    alone = torch.cat([kernel.skinny_linear(x[i:i + 1], w) for i in range(x.shape[0])])
    for rows in (2, 5, 7, 16, 33, 150):
        assert torch.equal(kernel.skinny_linear(x[:rows], w), alone[:rows]), rows
    assert torch.equal(kernel.skinny_linear(x[3:40], w), alone[3:40])


@needs_kernel
def test_module_swap_keeps_parameters_for_any_batch() -> None:
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8, bias=False))
    ref = [m.weight.clone() for m in model if isinstance(m, nn.Linear)]
    x_small, x_big = torch.randn(3, 32), torch.randn(2, 40, 32)
    want_small, want_big = model(x_small), model(x_big)
    assert use_cpu_kernels(model) == 2
    assert all(type(m) is SkinnyLinear for m in model if isinstance(m, nn.Linear))
    assert all(torch.equal(a, m.weight) for a, m in
               zip(ref, [m for m in model if isinstance(m, nn.Linear)], strict=True))
    torch.testing.assert_close(model(x_small), want_small, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x_big), want_big, atol=1e-5, rtol=1e-5)
