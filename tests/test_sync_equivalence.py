"""Tier 2: SyncBatchNorm on W gloo ranks equals torch BatchNorm on the whole batch (float64 reference).

Each spawn runs every case for one world size, so process start-up (~2 s) is paid once per W. Under
SYNCBN_TEST_DEVICE=cuda (make test-gpu) layer, reference and batches live on the GPU (tests/dist.py).
"""

from __future__ import annotations

import pytest
import torch

from syncbn import SyncBatchNorm, comms

from .dist import DEVICE, spawn, values
from .reference import TOLERANCE, compare_step, reference_bn, rel_err, rows_of

pytestmark = pytest.mark.multiprocess

SCALE = {"grad_input": 4, "grad_weight": 10, "grad_bias": 10}  # gradients sum more terms


def make_cases(world_size: int) -> list:
    n = 12
    splits = {
        "even": [n // world_size] * world_size,
        "uneven": {2: [3, 9], 3: [1, 5, 6], 4: [1, 2, 3, 6]}[world_size],
        "empty_rank": {2: [0, 12], 3: [6, 0, 6], 4: [4, 4, 0, 4]}[world_size],
    }
    cases = []
    for shape in [(n, 3), (n, 3, 5), (n, 4, 3, 3), (n, 2, 3, 2, 2)]:
        for split_name, split in splits.items():
            cases.append(dict(name=f"{len(shape)}D-{split_name}", shape=shape, splits=split))
    for shape in [(n, 4, 3, 3), (n, 2, 3, 2, 2)]:
        for split_name in ("even", "empty_rank"):
            cases.append(
                dict(
                    name=f"{len(shape)}D-channels_last-{split_name}",
                    shape=shape,
                    splits=splits[split_name],
                    cl=True,
                )
            )
    for opts in [
        dict(affine=False),
        dict(track_running_stats=False),
        dict(momentum=None),
        dict(momentum=0.3, eps=1e-3),
        dict(bias=False),
        dict(affine=False, track_running_stats=False),
    ]:
        name = "opts-" + ",".join(f"{k}={v}" for k, v in opts.items())
        cases.append(dict(name=name, shape=(n, 4, 3, 3), splits=splits["uneven"], opts=opts))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        cases.append(dict(name=f"dtype-{dtype}", shape=(n, 4, 3, 3), splits=splits["uneven"], dtype=dtype))
    for cl in (False, True):  # half input large enough on every rank for the one-pass float32 statistics
        shape, split = (n, 32, 32, 32), splits["even"]
        cases.append(
            dict(name=f"bfloat16-large-cl={cl}", shape=shape, splits=split, dtype=torch.bfloat16, cl=cl)
        )
    cases.append(
        dict(
            name="float32-channels_last",
            shape=(n, 4, 3, 3),
            splits=splits["even"],
            dtype=torch.float32,
            cl=True,
        )
    )
    return cases


def run_case(rank: int, world_size: int, case: dict, steps: int = 3) -> list:
    """Train ``steps`` steps on this rank's rows and compare everything with the reference."""
    opts = case.get("opts", {})
    dtype = case.get("dtype", torch.float64)
    shape, splits = case["shape"], case["splits"]
    c, ndim = shape[1], len(shape)
    gen = torch.Generator().manual_seed(1234)
    layer = SyncBatchNorm(
        c, **opts, device=DEVICE, dtype=torch.float64 if dtype == torch.float64 else torch.float32
    )
    ref = reference_bn(ndim, c, device=DEVICE, **opts)
    with torch.no_grad():
        if layer.weight is not None:
            w = 1 + 0.2 * torch.randn(c, generator=gen, dtype=torch.float64)
            layer.weight.copy_(w)
            ref.weight.copy_(w)
        if layer.bias is not None:
            b = 0.2 * torch.randn(c, generator=gen, dtype=torch.float64)
            layer.bias.copy_(b)
            ref.bias.copy_(b)
    rows = rows_of(rank, splits)
    tol = TOLERANCE[dtype]
    errors = []

    def check(what, got, want):
        errors.append((case["name"], what, rel_err(got, want), tol))

    for step in range(steps):
        xg = (3 * torch.randn(shape, generator=gen, dtype=torch.float64) + 2).to(DEVICE, dtype)
        dyg = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
        fmt = torch.contiguous_format
        if case.get("cl"):
            fmt = torch.channels_last if ndim == 4 else torch.channels_last_3d
        y, step_errors = compare_step(layer, ref, xg, dyg, rows, memory_format=fmt)

        assert y.dtype == dtype and y.shape == xg[rows].shape and y.device == xg.device
        if case.get("cl") and y.numel():
            assert y.is_contiguous(memory_format=fmt), "output lost channels_last"
        for what, err in step_errors.items():
            errors.append((case["name"], f"step{step}.{what}", err, tol * SCALE.get(what, 1)))
        if ref.running_mean is not None:
            assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked)

    # Eval mode is local (no collective): running stats when tracked, else this rank's own batch stats,
    # exactly as torch.nn.SyncBatchNorm does.
    layer.eval()
    ref.eval()
    with torch.no_grad():
        xg = (3 * torch.randn(shape, generator=gen, dtype=torch.float64) + 2).to(DEVICE, dtype)
        if ref.running_mean is not None:
            check("eval.output", layer(xg[rows]), ref(xg.double())[rows])
        elif splits[rank] > 1:
            check("eval.output", layer(xg[rows]), ref(xg[rows].double()))
    return errors


def run_all_cases(rank: int, world_size: int, exchange_max_ranks: int) -> list:
    comms.EXCHANGE_MAX_RANKS = exchange_max_ranks
    errors = []
    for case in make_cases(world_size):
        errors.extend(run_case(rank, world_size, case))
    return errors


# W=2: the two-rank swap; W=3: the direct exchange; W=4: gloo's allreduce (SYNCBN_EXCHANGE_MAX_RANKS=1),
# the path of NCCL and of larger gloo groups.
@pytest.mark.parametrize(("world_size", "exchange_max_ranks"), [(2, 8), (3, 8), (4, 1)])
def test_matches_batchnorm_on_global_batch(world_size, exchange_max_ranks, tmp_path):
    per_rank = values(spawn(run_all_cases, world_size, tmp_path, exchange_max_ranks, timeout=150))
    failures = [
        f"rank {r} {name} {what}: err {err:.3g} > tol {tol:.3g}"
        for r, errors in enumerate(per_rank)
        for name, what, err, tol in errors
        if not err <= tol
    ]
    assert not failures, "\n".join(failures)
    assert len(per_rank[0]) > 100  # the cases really ran
