"""The sync function's device kernels against torch BatchNorm (tier 1): on CUDA (one GPU) and on CPU.

Runs the sync function itself on a one-rank gloo group, so every device branch is exercised: on CUDA
batch_norm_stats, batch_norm_elemt, backward_reduce/elemt (skipped without a GPU); on CPU the few-dispatch
path for small inputs and the few-pass path for large ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from syncbn.functional import _apply

from .reference import rel_err

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


CASES = [
    dict(shape=(8, 4, 5, 5)),
    dict(shape=(8, 4, 5, 5), channels_last=True),
    dict(shape=(16, 4)),  # (N, C): the kernels take their channels-last template
    dict(shape=(6, 3, 7), affine=False),
    dict(shape=(6, 3, 2, 2), channels_last=True, affine=False),
    dict(shape=(6, 3, 2, 2), bias=False),
    dict(shape=(4, 3, 2, 2, 2)),
    dict(shape=(8, 4, 5, 5), dtype=torch.float16, param_dtype=torch.float16),  # model.half()
    dict(shape=(8, 4, 5, 5), dtype=torch.bfloat16),  # autocast-style: half input, float32 params
    dict(shape=(8, 4, 5, 5), dtype=torch.float64, param_dtype=torch.float32),
    dict(shape=(2, 3), constant=True),  # a constant channel: variance exactly 0
    dict(shape=(4, 4, 64, 64)),  # large: the CPU's plain-sums and two-pass input-grad branches
    dict(shape=(4, 4, 64, 64), channels_last=True),
    dict(shape=(4, 4, 64, 64), channels_last=True, constant=True),
    dict(shape=(16384, 6), offset=1e4),  # |mean| >> std: the CPU falls back to shifted moments
    dict(shape=(4, 4, 64, 64), dtype=torch.bfloat16),
    dict(shape=(16384, 6), dtype=torch.float64, param_dtype=torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("device", DEVICES)
def test_sync_function_matches_batchnorm(world_of_one, device, case):
    dev = torch.device(device)
    dtype = case.get("dtype", torch.float32)
    pdt = case.get("param_dtype", torch.float32 if dtype != torch.float64 else torch.float64)
    c = case["shape"][1]
    torch.manual_seed(0)
    x = torch.randn(case["shape"], dtype=torch.float64) * 2 + case.get("offset", 1.0)
    if case.get("constant"):
        x[:, 1] = 3.0
    x = x.to(dev, dtype)
    if case.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    x.requires_grad_(True)
    affine = case.get("affine", True)
    w = torch.randn(c, device=dev, dtype=pdt, requires_grad=True) if affine else None
    b = (
        torch.randn(c, device=dev, dtype=pdt, requires_grad=True)
        if affine and case.get("bias", True)
        else None
    )
    rm, rv = torch.zeros(c, device=dev, dtype=pdt), torch.ones(c, device=dev, dtype=pdt)
    y = _apply(x, w, b, rm, rv, eps=1e-5, momentum=0.1, num_features=c, process_group=None)
    dy = torch.randn_like(y)
    y.backward(dy)

    xr = x.detach().double().requires_grad_(True)
    wr = w.detach().double().requires_grad_(True) if w is not None else None
    br = b.detach().double().requires_grad_(True) if b is not None else None
    rmr, rvr = torch.zeros(c, device=dev, dtype=torch.float64), torch.ones(c, device=dev, dtype=torch.float64)
    yr = F.batch_norm(xr, rmr, rvr, wr, br, True, 0.1, 1e-5)
    yr.backward(dy.double())
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    assert y.dtype == dtype and torch.isfinite(rv).all()
    assert rel_err(y, yr) < tol * 10
    assert rel_err(x.grad, xr.grad) < tol * 40
    # running stats and parameter grads are held in the parameters' dtype (float32 ones hold ~1e-7)
    ptol = max(tol, {torch.float64: 1e-9, torch.float32: 1e-6, torch.float16: 1e-2}[pdt])
    assert rel_err(rm, rmr) < ptol and rel_err(rv, rvr) < ptol
    if w is not None:
        assert w.grad.dtype == pdt and rel_err(w.grad, wr.grad) < ptol * 40
    if b is not None:
        assert b.grad.dtype == pdt and rel_err(b.grad, br.grad) < ptol * 40
    # bias=False (affine without bias) is covered by the comparison with the bias-free reference above,
    # and by backward itself: autograd raises if a gradient comes back for an input that was None.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count", [1.0e6, 3.0e9])  # 3e9 values per channel: past CUDA's int32 count
def test_input_gradient_for_global_counts_past_int32(device, count):
    """A huge global batch (3-D input on many GPUs) can hold more than 2^31 values per channel. CUDA's
    native input-gradient kernel takes the count as int32, so past that the layer takes the device-agnostic
    path; either way dx = w invstd (dy - sum dy / N - xhat sum(dy xhat) / N) with the reduced sums."""
    from syncbn import kernels

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64) + 1.0).float().to(dev)
    dy = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64).float().to(dev)
    w = torch.rand(3, generator=gen, dtype=torch.float64).float().to(dev) + 0.5
    mean, var = x.double().mean((0, 2, 3)).float(), x.double().var((0, 2, 3), unbiased=False).float()
    ws = kernels.Workspace(3, dev)
    sums = torch.randn(2, 3, generator=gen, dtype=torch.float64) * count  # the other ranks' share included
    ws.data.copy_(sums)
    dx = kernels.input_grad(dy, x, w, mean, var, ws, count=count, eps=1e-5)

    view = (1, -1, 1, 1)
    invstd = (var.double() + 1e-5).rsqrt().view(view)
    xhat = (x.double() - mean.double().view(view)) * invstd
    sum_dy, sum_dy_xhat = (s.to(dev).view(view) for s in sums)
    want = w.double().view(view) * invstd * (dy.double() - sum_dy / count - xhat * sum_dy_xhat / count)
    assert dx.dtype == torch.float32 and torch.isfinite(dx).all()
    assert rel_err(dx, want) < 1e-5
