"""Tier 1: convert_sync_batchnorm / revert_sync_batchnorm swap layers, share state, round-trip checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syncbn import BatchNormNd, SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.BatchNorm1d(4),
        nn.Sequential(nn.Unflatten(2, (2, 4)), nn.BatchNorm2d(4, momentum=None), nn.Unflatten(2, (1, 2))),
        nn.BatchNorm3d(4, affine=False),
        nn.Flatten(2),
        nn.InstanceNorm1d(4),
    )


def test_convert_replaces_every_batchnorm_and_shares_state():
    net = model()
    before = {name: m for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    params = {id(p) for p in net.parameters()}
    buffers = {id(b) for b in net.buffers()}
    net[1].weight.requires_grad_(False)
    net.eval()
    group = object()  # any object stands for a process group here; it is only stored
    converted = convert_sync_batchnorm(net, process_group=group)
    assert converted is net
    for name, old in before.items():
        new = converted.get_submodule(name)
        assert type(new) is SyncBatchNorm and new.process_group is group
        assert new.num_features == old.num_features and new.eps == old.eps and new.momentum == old.momentum
        assert new.affine == old.affine and new.track_running_stats == old.track_running_stats
        assert new.running_mean is old.running_mean and new.weight is old.weight
        assert not new.training
    assert {id(p) for p in net.parameters()} == params and {id(b) for b in net.buffers()} == buffers
    assert not net[1].weight.requires_grad
    assert type(net[5]) is nn.InstanceNorm1d


def test_convert_root_module_and_torch_syncbatchnorm():
    bn = nn.BatchNorm2d(3)
    out = convert_sync_batchnorm(bn)
    assert isinstance(out, SyncBatchNorm) and out.weight is bn.weight
    torch_sync = nn.SyncBatchNorm(3)
    assert isinstance(convert_sync_batchnorm(torch_sync), SyncBatchNorm)
    assert convert_sync_batchnorm(out) is out
    assert isinstance(SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(2)), SyncBatchNorm)


def test_convert_refuses_uninitialized_lazy_batchnorm():
    with pytest.raises(ValueError, match="uninitialized"):
        convert_sync_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()))


def test_revert_round_trip_restores_classes_and_outputs():
    """Train converted (single process falls back to BatchNorm), revert, reload: same eval outputs."""
    net = convert_sync_batchnorm(model())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(6, 2, 10)).pow(2).mean().backward()
        opt.step()
    net.eval()
    x = torch.randn(5, 2, 10)
    expected = net(x)
    state = net.state_dict()

    reverted = revert_sync_batchnorm(net)
    assert [type(m) for m in reverted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
    ]
    assert torch.equal(reverted(x), expected)
    fresh = model()
    fresh.load_state_dict(state)
    fresh.eval()
    assert torch.equal(fresh(x), expected)


def test_revert_unknown_origin_gives_any_rank_batchnorm():
    layer = revert_sync_batchnorm(nn.Sequential(SyncBatchNorm(3), nn.SyncBatchNorm(3)))
    assert all(type(m) is BatchNormNd for m in layer)
    for shape in [(4, 3), (4, 3, 2), (4, 3, 2, 2), (4, 3, 2, 2, 2)]:
        ref = nn.functional.batch_norm(torch.ones(shape), None, None, training=True)
        assert torch.equal(layer[0](torch.ones(shape)), ref)
