"""Tier 2: whole-model training with DDP, and sync restricted to subgroups.

A converted CNN trained with DistributedDataParallel on 3 ranks must end bit-for-bit close (float64) to the
plain-BatchNorm CNN trained in one process on the whole batch; subgroups must behave like separate jobs.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from syncbn import SyncBatchNorm, convert_sync_batchnorm

from .dist import spawn, values
from .reference import compare_step, reference_bn, rel_err, rows_of

pytestmark = pytest.mark.multiprocess


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6),
        nn.Linear(6, 4),
    ).double()


def _train(model, batches, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches[:steps]:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def ddp_matches_single_process(rank: int, world_size: int, steps: int = 5) -> dict:
    gen = torch.Generator().manual_seed(42)
    per_rank = 4
    batches = [
        (
            torch.randn(per_rank * world_size, 3, 8, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (per_rank * world_size,), generator=gen),
        )
        for _ in range(steps)
    ]
    reference = _train(small_cnn(), batches, steps)

    model = convert_sync_batchnorm(small_cnn())
    assert sum(isinstance(m, SyncBatchNorm) for m in model.modules()) == 3
    ddp = DistributedDataParallel(model)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    _train(ddp, [(x[rows], y[rows]) for x, y in batches], steps)

    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    return {k: rel_err(got[k], want[k]) for k in want}


def subgroups_match_per_group_batchnorm(rank: int, world_size: int) -> dict:
    """W=4 as two groups of 2: each group equals BatchNorm on that group's own batch."""
    group, _ = dist.new_subgroups(group_size=2)
    group_id, rows = rank // 2, rows_of(rank % 2, [3, 5])  # uneven inside each group
    gen = torch.Generator().manual_seed(10 + group_id)  # each group sees its own global batch
    xg = torch.randn(8, 4, 3, generator=gen, dtype=torch.float64)
    dyg = torch.randn(8, 4, 3, generator=gen, dtype=torch.float64)
    layer = SyncBatchNorm(4, process_group=group, dtype=torch.float64)
    _, errors = compare_step(layer, reference_bn(3, 4), xg, dyg, rows, process_group=group)
    return errors


def test_ddp_training_matches_single_process(tmp_path):
    per_rank = values(spawn(ddp_matches_single_process, 3, tmp_path, timeout=120))
    for rank, errors in enumerate(per_rank):
        bad = {k: e for k, e in errors.items() if not e < 1e-9}
        assert not bad, f"rank {rank}: parameters/buffers differ from single-process training: {bad}"
        assert any("running_var" in k for k in errors)


def test_subgroups_sync_only_within_their_group(tmp_path):
    per_rank = values(spawn(subgroups_match_per_group_batchnorm, 4, tmp_path, timeout=120))
    for rank, errors in enumerate(per_rank):
        assert all(e < 1e-10 for e in errors.values()), (rank, errors)
