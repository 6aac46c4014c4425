"""Tier 1 (one process): the CPU statistics kernels of :mod:`syncbn.kernels` against float64, per path."""

from __future__ import annotations

import pytest
import torch

from syncbn import kernels, pairing
from syncbn.testing import aten_ops


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(mean, biased var) as pack_moments packs them (float64), and the ops it dispatched (warm)."""
    ws = kernels.Workspace(x.shape[1], x.device)
    call_row, code_row = pairing.tail_parts(1, 0, False, x.device)
    kernels.pack_moments(x, ws, call_row, code_row, sums=False)  # a layer's first call fills its caches
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


# What one pass over a small input must hold against float64 (|error of mean| / std, |error of var| / var)
# at |mean| up to 6 std (under 10 despite sampling spread); the shifted path it replaces is within the same.
SMALL_TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


@pytest.mark.parametrize("dtype", list(SMALL_TOLERANCE))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
@pytest.mark.parametrize("offset", [0.0, 3.0, 6.0, 1e3])
def test_small_input_moments(dtype, layout, offset):
    """Small input (the per-layer-overhead regime): while every channel has |mean| <= 10 std, its moments
    come from one kernel pass over the input itself, three dispatches for the whole payload (no shift
    view, no shifted copy, no shift added back); past that, about a shift, as accurate as ever."""
    shape = (64, 512) if layout == "2d" else (4, 32, 8, 8)
    gen = torch.Generator().manual_seed(5)
    scale = torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5  # per-channel std and offset
    scale = scale.view((1, -1) + (1,) * (len(shape) - 2))
    x = ((torch.randn(shape, generator=gen, dtype=torch.float64) + offset) * scale).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    assert x.numel() < kernels.LARGE
    mean, var, ops = _moments(x)
    dims = [0, *range(2, x.dim())]
    want_mean, want_var = x.double().mean(dims), x.double().var(dims, unbiased=False)
    tol = SMALL_TOLERANCE[dtype]
    assert ((mean - want_mean).abs() <= tol * want_var.sqrt()).all()
    # float64's own E[x^2] - mean^2 in _moments costs ~1e-16 (mean/std)^2 of the variance
    assert ((var - want_var).abs() <= (tol + 1e-15 * offset**2) * want_var).all()
    if offset > 10:
        assert "aten::sub" in ops, ops
    else:
        assert ops == ["aten::batch_norm_update_stats", "aten::cat", "aten::addcmul_"], ops


def test_one_channel_past_ten_std_takes_the_shift():
    """The check is per channel: one channel far from zero sends the whole input about the shift."""
    x = torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(1))
    x[:, 6] += 50.0
    mean, var, ops = _moments(x)
    assert "aten::sub" in ops, ops
    want = x.double()
    assert torch.allclose(mean, want.mean((0, 2, 3)), rtol=0, atol=1e-5)
    assert torch.allclose(var, want.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=0)


def test_nan_input_keeps_nan_statistics_in_one_pass():
    """A NaN compares false against the 10-std check: the NaN stays in that channel's statistics (as
    BatchNorm's would), with no second pass."""
    x = torch.randn(4, 8, 5, 5)
    x[1, 2, 3, 3] = float("nan")
    mean, var, ops = _moments(x)
    assert ops == ["aten::batch_norm_update_stats", "aten::cat", "aten::addcmul_"], ops
    assert mean[2].isnan() and var[2].isnan()
    others = [c for c in range(8) if c != 2]
    assert torch.isfinite(mean[others]).all() and torch.isfinite(var[others]).all()
