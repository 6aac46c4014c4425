"""NCCL with one rank (tier 1 on one GPU): the synced path's collectives over a real NCCL process group.

One process, world size 1: the all-reduces, the first-call channel check and its error path all run
through NCCL on CUDA tensors. Skipped without CUDA or without NCCL; `make test-gpu` runs it.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from syncbn import comms, convert_sync_batchnorm, sync_batch_norm
from syncbn.functional import _apply

from .reference import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not dist.is_nccl_available(), reason="needs a torch built with NCCL"),
]


@pytest.fixture
def nccl_world_of_one(tmp_path):
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl",
        init_method=f"file://{tmp_path / 'init'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    yield torch.device("cuda", 0)
    dist.destroy_process_group()


CASES = [
    dict(shape=(8, 4, 5, 5), dtype=torch.float32),
    dict(shape=(8, 4, 5, 5), dtype=torch.float32, channels_last=True),
    dict(shape=(16, 4), dtype=torch.float64),
    dict(shape=(8, 4, 5, 5), dtype=torch.bfloat16),
    dict(shape=(4, 3, 2, 2, 2), dtype=torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_synced_path_over_nccl_matches_batchnorm(nccl_world_of_one, case):
    dev, dtype, c = nccl_world_of_one, case["dtype"], case["shape"][1]
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    torch.manual_seed(0)
    x = (torch.randn(case["shape"], dtype=torch.float64) * 2 + 1).to(dev, dtype)
    if case.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(c, device=dev, dtype=pdt, requires_grad=True)
    b = torch.randn(c, device=dev, dtype=pdt, requires_grad=True)
    rm, rv = torch.zeros(c, device=dev, dtype=pdt), torch.ones(c, device=dev, dtype=pdt)
    y = _apply(x, w, b, rm, rv, eps=1e-5, momentum=0.1, num_features=c, process_group=None)
    dy = torch.randn_like(y)
    y.backward(dy)

    xr = x.detach().double().requires_grad_(True)
    wr, br = (t.detach().double().requires_grad_(True) for t in (w, b))
    rmr, rvr = torch.zeros(c, device=dev, dtype=torch.float64), torch.ones(c, device=dev, dtype=torch.float64)
    yr = F.batch_norm(xr, rmr, rvr, wr, br, True, 0.1, 1e-5)
    yr.backward(dy.double())
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    assert y.dtype == dtype and y.device == dev and x.grad.device == dev
    assert rel_err(y, yr) < tol * 10
    assert rel_err(x.grad, xr.grad) < tol * 40
    assert rel_err(rm, rmr) < max(tol, 1e-6) and rel_err(rv, rvr) < max(tol, 1e-6)
    assert w.grad.dtype == pdt and rel_err(w.grad, wr.grad) < max(tol, 1e-6) * 40
    assert b.grad.dtype == pdt and rel_err(b.grad, br.grad) < max(tol, 1e-6) * 40


def test_channel_check_and_its_error_path_over_nccl(nccl_world_of_one):
    comms.check_num_features(4, nccl_world_of_one, None)  # agrees with itself: no error
    with pytest.raises(ValueError, match="rank 0: bad input here"):
        comms.check_num_features(4, nccl_world_of_one, None, "bad input here")
    y = sync_batch_norm(torch.randn(6, 4, device=nccl_world_of_one), None, None, training=True)
    assert y.device == nccl_world_of_one  # one rank: plain F.batch_norm, no collective


def test_a_converted_model_trains_under_ddp_over_nccl(nccl_world_of_one):
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    dev = nccl_world_of_one
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4)
    )
    model = convert_sync_batchnorm(model).to(dev)
    ddp = DistributedDataParallel(model, device_ids=[dev.index])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 8, 8, device=dev), torch.randint(0, 4, (4,), device=dev)
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert int(model[1].num_batches_tracked) == 3 and model[1].running_mean.device == dev
