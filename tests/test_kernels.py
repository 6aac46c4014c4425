"""Tier 1 (one process): the CPU statistics kernels of :mod:`syncbn.kernels` against float64, per path."""

from __future__ import annotations

import pytest
import torch

from syncbn import kernels, pairing
from syncbn.testing import aten_ops


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(mean, biased var) as pack_moments packs them (float64), and the ops it dispatched."""
    ws = kernels.Workspace(x.shape[1], x.device)
    call_row, code_row = pairing.tail_parts(1, 0, False, x.device)
    ops = aten_ops(lambda: kernels.pack_moments(x, ws, call_row, code_row, sums=False))
    mean = ws.first.clone()
    return mean, ws.second - mean.square(), ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
@pytest.mark.parametrize("offset", [0.0, 3.0, 1e3])
def test_large_half_input_moments(dtype, layout, offset):
    """Large half input: one pass over the input itself, accumulated in float32 (no float32 copy of the
    activation) while |mean| <= 10 std; past that, moments about a shift. Either way close to float64."""
    shape = (64, 1024) if layout == "2d" else (16, 64, 8, 8)
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) + offset).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert x.numel() >= kernels.LARGE
    mean, var, ops = _moments(x)
    dims = [0, *range(2, x.dim())]
    want_mean, want_var = x.double().mean(dims), x.double().var(dims, unbiased=False)
    assert (mean - want_mean).abs().max() <= 1e-6 * (1 + offset)
    assert ((var - want_var).abs() <= 2e-4 * want_var + 1e-12).all()  # bf16 near 1e3: some channels constant
    shifted = "aten::sub" in ops  # the shift's x - x[0]: a float32 copy of the whole input
    assert shifted == (offset > 10), ops
