"""task=check: a self-test to run on a cluster before a long job.

Every rank normalizes its (uneven) slice of a seeded global batch with SyncBatchNorm (torch.compile'd with
``task.compile``), forward and backward, and compares with float64 BatchNorm on the whole batch; it also
times one all-reduce of the stats payload. Prints backend, world size, max error and latency; a failure
raises on every rank (non-zero exit).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from syncbn import SyncBatchNorm
from syncbn.testing import compare_step, reference_batch_norm, rows_of

from . import report
from .models import compile_model
from .runtime import Context, snapshot, sync_group


def uneven_splits(total: int, parts: int) -> list[int]:
    """Split ``total`` rows over ``parts`` ranks in proportion 1:2:...:parts (some may get 0)."""
    weights = list(range(1, parts + 1))
    sizes = [total * w // sum(weights) for w in weights]
    sizes[-1] += total - sum(sizes)
    return sizes


def _max_error(ctx: Context, group) -> float:
    """Largest relative error of this rank's SyncBN against float64 BatchNorm on its group's whole batch."""
    settings = ctx.task
    shape = [settings["global_batch"], settings["channels"], *settings["spatial"]]
    group_size = dist.get_world_size(group) if group is not None else ctx.world_size
    group_rank = dist.get_rank(group) if group is not None else ctx.rank
    rows = rows_of(group_rank, uneven_splits(shape[0], group_size))
    # One seeded global batch per sync group: the groups are independent jobs.
    gen = torch.Generator().manual_seed(ctx.cfg["seed"] + ctx.rank // group_size)
    layer = SyncBatchNorm(shape[1], process_group=group, device=ctx.device, dtype=torch.float64)
    reference = reference_batch_norm(len(shape), shape[1], device=ctx.device)
    # The compiled module shares the layer's parameters and buffers, so the comparison reads the same state.
    step = compile_model(layer, ctx.device) if settings["compile"] else layer
    worst = 0.0
    for _ in range(settings["steps"]):
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1).to(ctx.device)
        dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(ctx.device)
        _, errors = compare_step(step, reference, x, dy, rows, process_group=group)
        worst = max(worst, *errors.values())
    return worst


def _all_reduce_latency_us(ctx: Context, numel: int, iters: int) -> float:
    payload = torch.zeros(numel, dtype=torch.float64, device=ctx.device)
    times = []
    for i in range(iters + 5):
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.all_reduce(payload)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 5:  # warm-up excluded
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def check(ctx: Context) -> None:
    snapshot(ctx)
    c = ctx.task
    group = sync_group(ctx)
    err = torch.tensor([_max_error(ctx, group)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)  # the verdict is the same on every rank
    max_err = err.item()
    latency = _all_reduce_latency_us(ctx, 2 * c["channels"] + 1, c["comm_iters"])
    passed = max_err <= c["tol"]
    result = {
        "passed": passed,
        "backend": ctx.backend,
        "device": ctx.device.type,
        "world_size": ctx.world_size,
        "group_size": ctx.cfg["norm"].get("group_size") or ctx.world_size,
        "max_error": max_err,
        "tolerance": c["tol"],
        "allreduce_numel": 2 * c["channels"] + 1,
        "allreduce_latency_us": round(latency, 1),
        "compiled": c["compile"],
    }
    if ctx.is_main:
        report.write_json(ctx.run_dir / "check.json", result)
        ctx.log.info(
            "syncbn check %s%s: backend %s, world size %d (sync groups of %d), max rel. error %.3g "
            "(tol %.0e), all-reduce of %d float64: %.1f us median",
            "PASSED" if passed else "FAILED",
            " (layer compiled)" if c["compile"] else "",
            result["backend"],
            result["world_size"],
            result["group_size"],
            max_err,
            c["tol"],
            result["allreduce_numel"],
            latency,
        )
    if not passed:
        raise RuntimeError(
            f"syncbn check failed: max relative error {max_err:.3g} > tolerance {c['tol']:.0e}"
        )
