"""Tier 1: torch.export of a converted model in eval mode, and of a reverted one, computes what eager does.

The models mix a plain BatchNorm (-> SyncBatchNorm) with BatchNorm subclasses (-> synced subclasses), after a
training step so the running statistics are not the defaults. The batch dimension is exported as dynamic.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syncbn import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

from .standins import standin_cnn


def trained_model(norm: str) -> nn.Module:
    model = nn.Sequential(nn.BatchNorm2d(3, dtype=torch.float64), standin_cnn(norm))
    model(torch.randn(8, 3, 8, 8, dtype=torch.float64) * 2 + 1)
    return model.eval()


def export_and_run(model: nn.Module, x: torch.Tensor, other: torch.Tensor) -> tuple:
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes={"input": {0: batch}})
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    return program.module()(x), program.module()(other), ops


@pytest.mark.parametrize("norm", ["bnact", "scaled"])
def test_export_of_converted_and_reverted_models_matches_eager(norm):
    model = convert_sync_batchnorm(trained_model(norm))
    assert sum(isinstance(m, SyncBatchNorm) for m in model.modules()) == 5
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    other = torch.randn(7, 3, 8, 8, dtype=torch.float64)  # another batch size through the same program
    want, want_other = model(x), model(other)

    got, got_other, ops = export_and_run(model, x, other)
    assert torch.equal(got, want) and torch.equal(got_other, want_other)
    assert not any("c10d" in op for op in ops)  # eval mode: no collective in the graph

    reverted = revert_sync_batchnorm(model)
    assert not any(isinstance(m, SyncBatchNorm) for m in reverted.modules())
    got, got_other, _ = export_and_run(reverted, x, other)
    assert torch.equal(got, want) and torch.equal(got_other, want_other)
