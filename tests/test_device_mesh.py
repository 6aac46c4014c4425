"""Tier 2: ``process_group=`` accepts a 1-D DeviceMesh (``mesh``, ``mesh["dp"]``), as FSDP2 code holds groups.

W=2 with ``init_device_mesh("cpu", (2,))`` and W=4 with a (dp=2, tp=2) mesh sliced to ``mesh["dp"]``: the
SyncBatchNorm constructor and convert_sync_batchnorm (plain and subclass layers) must sync over exactly the
mesh's group, matching float64 BatchNorm on that group's concatenated batch; a 2-D mesh is refused.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syncbn import SyncBatchNorm, convert_sync_batchnorm

from .dist import spawn, values
from .reference import rel_err, rows_of
from .standins import BatchNormAct2d

pytestmark = pytest.mark.multiprocess
SPLITS = [3, 5]  # uneven batches inside each mesh group


def _layers(mesh) -> dict:
    """The same kind of layer built three ways over ``mesh``, with its float64 single-process reference."""
    act = BatchNormAct2d(4, dtype=torch.float64)
    return {
        "constructor": (
            SyncBatchNorm(4, process_group=mesh, dtype=torch.float64),
            nn.BatchNorm2d(4).double(),
        ),
        "convert_plain": (
            convert_sync_batchnorm(nn.BatchNorm2d(4).double(), mesh),
            nn.BatchNorm2d(4).double(),
        ),
        "convert_subclass": (convert_sync_batchnorm(BatchNormAct2d(4, dtype=torch.float64), mesh), act),
    }


def _compare(layer: nn.Module, reference: nn.Module, position: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)  # every member of one group draws the same global batch
    xg = torch.randn(sum(SPLITS), 4, 3, 3, generator=gen, dtype=torch.float64) * 2 + 3
    dyg = torch.randn(xg.shape, generator=gen, dtype=torch.float64)
    rows = rows_of(position, SPLITS)
    x = xg[rows].clone().requires_grad_(True)
    layer(x).backward(dyg[rows])
    xr = xg.clone().requires_grad_(True)
    out = reference(xr)
    out.backward(dyg)
    x2 = xg[rows].clone()
    return {
        "output": rel_err(layer.eval()(x2), reference.eval()(xg)[rows]),  # eval with the synced stats
        "grad_input": rel_err(x.grad, xr.grad[rows]),
        "running_mean": rel_err(layer.running_mean, reference.running_mean),
        "running_var": rel_err(layer.running_var, reference.running_var),
    }


def mesh_layers_match_reference(rank: int, world_size: int, shape: tuple) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    names = ("dp", "tp")[: len(shape)]
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    dp = mesh["dp"]
    meshes = {"mesh": mesh, "mesh['dp']": dp} if len(shape) == 1 else {"mesh['dp']": dp}
    refused = None
    if len(shape) == 2:
        try:
            SyncBatchNorm(4, process_group=mesh)
        except ValueError as e:
            refused = str(e)
    errors = {}
    seed = min(dp.mesh.tolist())  # one seed per dp group: its first global rank
    for how, m in meshes.items():
        for kind, (layer, reference) in _layers(m).items():
            errors.update(
                {
                    f"{how}/{kind}/{k}": e
                    for k, e in _compare(layer, reference, dp.get_local_rank(), seed).items()
                }
            )
    return {"errors": errors, "dp_ranks": dp.mesh.tolist(), "refused": refused}


def test_one_dimensional_mesh_syncs_like_its_group(tmp_path):
    for rank, result in enumerate(values(spawn(mesh_layers_match_reference, 2, tmp_path, (2,), timeout=120))):
        assert result["dp_ranks"] == [0, 1]
        bad = {k: e for k, e in result["errors"].items() if not e < 1e-10}
        assert not bad and len(result["errors"]) == 24, (rank, bad)


def test_dp_slice_of_a_two_dimensional_mesh_syncs_only_its_group(tmp_path):
    results = values(spawn(mesh_layers_match_reference, 4, tmp_path, (2, 2), timeout=180))
    for rank, result in enumerate(results):
        assert result["dp_ranks"] == [
            rank % 2,
            rank % 2 + 2,
        ]  # the dp groups of a (2, 2) mesh: {0, 2}, {1, 3}
        bad = {k: e for k, e in result["errors"].items() if not e < 1e-10}
        assert not bad and len(result["errors"]) == 12, (rank, bad)
        assert (
            "must be a 1-D DeviceMesh" in result["refused"]
            and "2-D mesh of shape (2, 2)" in result["refused"]
        )
        assert "('dp', 'tp')" in result["refused"]
