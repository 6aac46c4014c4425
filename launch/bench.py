"""task=bench: how much a SyncBN training step costs next to local BatchNorm plus the bare communication.

Per rank, median forward+backward time of one layer, measured interleaved (A B C D A B C D ...) so drift
hits every variant alike:
  syncbn  ours, training mode          local  F.batch_norm on the same local batch, no sync
  comm    all-reduce of 2C+1 and 2C    naive  autograd SyncBN (count all-reduce, then sums; autograd backward)
  torch   torch.nn.SyncBatchNorm (CUDA only)
floor_ratio = syncbn / (local + comm); naive_speedup = naive / syncbn. Ranks beyond a world size wait.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from syncbn import SyncBatchNorm

from .runtime import Context, snapshot

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): what an autograd SyncBN leans on."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def naive_sync_bn(x: torch.Tensor, weight, bias, group, eps: float = 1e-5) -> torch.Tensor:
    """The peer to beat: count all-reduce, sum/sum-of-squares all-reduce, backward left to autograd."""
    c = x.shape[1]
    dims = [0, *range(2, x.dim())]
    count = torch.tensor([x.numel() // c], dtype=torch.float32, device=x.device)
    dist.all_reduce(count, group=group)
    sums = _AllReduceSum.apply(torch.cat([x.sum(dims), (x * x).sum(dims)]).float(), group)
    mean = sums[:c] / count
    var = sums[c:] / count - mean * mean
    shape = (1, c) + (1,) * (x.dim() - 2)
    scale = (var + eps).rsqrt() * weight
    return (x - mean.view(shape)) * scale.view(shape) + bias.view(shape)


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while running ``fn``."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.device)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _cases(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    cases = []
    for shape in cfg["shapes"]:
        formats = (
            ["contiguous", "channels_last"] if len(shape) == 4 and cfg["channels_last"] else ["contiguous"]
        )
        for fmt in formats:
            for dtype in cfg["dtypes"]:
                cases.append({"shape": list(shape), "format": fmt, "dtype": dtype})
    return cases


def _time_case(ctx: Context, case: dict, group, world: int, rounds: int, warmup: int) -> dict[str, float]:
    cfg_dtype = DTYPES[case["dtype"]]
    shape, c = case["shape"], case["shape"][1]
    dev = ctx.device
    torch.manual_seed(ctx.rank)
    x = torch.randn(shape, device=dev, dtype=cfg_dtype)
    dy = torch.randn(shape, device=dev, dtype=cfg_dtype)
    if case["format"] == "channels_last":
        x, dy = (
            x.contiguous(memory_format=torch.channels_last),
            dy.contiguous(memory_format=torch.channels_last),
        )
    x.requires_grad_(True)
    weight = torch.ones(c, device=dev, requires_grad=True)
    bias = torch.zeros(c, device=dev, requires_grad=True)
    ours = SyncBatchNorm(c, process_group=group, device=dev)
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
    stats_in = torch.zeros(2 * c + 1, device=dev)
    stats_back = torch.zeros(2 * c, device=dev)

    def run_syncbn():
        ours(x).backward(dy)

    def run_local():
        F.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5).backward(dy)

    def run_comm():
        if world > 1:
            dist.all_reduce(stats_in, group=group)
            dist.all_reduce(stats_back, group=group)

    def run_naive():
        naive_sync_bn(x, weight, bias, group).backward(dy)

    variants = {"syncbn": run_syncbn, "local": run_local, "comm": run_comm, "naive": run_naive}
    if dev.type == "cuda" and world > 1:
        theirs = torch.nn.SyncBatchNorm(c, process_group=group, device=dev)
        variants["torch"] = lambda: theirs(x).backward(dy)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + rounds):
        for name, fn in variants.items():
            if world > 1:
                dist.barrier(group=group)  # start together: waiting for a late peer is not our cost
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
            x.grad = weight.grad = bias.grad = None
    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    # The step is as slow as the slowest rank: take the max of the medians over the group.
    packed = torch.tensor(list(medians.values()), dtype=torch.float64, device=dev)
    if world > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    result = dict(zip(medians, packed.tolist(), strict=True))
    result["saved_MB_syncbn"] = saved_bytes(lambda: ours(x)) / 2**20
    result["saved_MB_local"] = (
        saved_bytes(lambda: F.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5)) / 2**20
    )
    result["saved_MB_naive"] = saved_bytes(lambda: naive_sync_bn(x, weight, bias, group)) / 2**20
    return result


def bench(ctx: Context) -> None:
    snapshot(ctx)
    cfg = ctx.task
    torch.set_num_threads(cfg["threads"])
    sizes = [w for w in cfg["world_sizes"] if w <= ctx.world_size]
    skipped = [w for w in cfg["world_sizes"] if w > ctx.world_size]
    # new_group is collective over the world: build every group on every rank, in the same order.
    groups = {w: dist.new_group(list(range(w))) for w in sizes}
    rows = []
    for w in sizes:
        if ctx.rank < w:
            for case in _cases(cfg):
                result = _time_case(ctx, case, groups[w], w, cfg["rounds"], cfg["warmup"])
                floor = result["local"] + result["comm"]
                row = {
                    "world_size": w,
                    "shape": "x".join(map(str, case["shape"])),
                    "format": case["format"],
                    "dtype": case["dtype"],
                    **{k: round(v, 4) for k, v in result.items()},
                    "floor_ratio": round(result["syncbn"] / floor, 3),
                    "naive_speedup": round(result["naive"] / result["syncbn"], 3),
                }
                rows.append(row)
                if ctx.is_main:
                    ctx.log.info(
                        "W=%d %-14s %-13s %-8s syncbn %.3f ms  local %.3f  comm %.3f  naive %.3f  "
                        "floor_ratio %.3f  naive_speedup %.2f",
                        w,
                        row["shape"],
                        row["format"],
                        row["dtype"],
                        row["syncbn"],
                        row["local"],
                        row["comm"],
                        row["naive"],
                        row["floor_ratio"],
                        row["naive_speedup"],
                    )
        dist.barrier()  # ranks outside this world size wait here (make bench raises timeout_s)
    if ctx.is_main:
        _write(ctx, rows, skipped)


def _write(ctx: Context, rows: list[dict[str, Any]], skipped: list[int]) -> None:
    from . import report

    run_dir = ctx.run_dir
    with open(run_dir / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {
        "device": ctx.device.type,
        "backend": ctx.backend,
        "threads_per_rank": ctx.task["threads"],
        "rounds": ctx.task["rounds"],
        "world_sizes_skipped": skipped,
        "torch": torch.__version__,
        "rows": rows,
    }
    (run_dir / "bench.json").write_text(json.dumps(meta, indent=2) + "\n")
    _plot(run_dir, rows)
    columns = ["world_size", "shape", "format", "dtype", "syncbn", "local", "comm", "naive"]
    columns += ["floor_ratio", "naive_speedup", "saved_MB_syncbn", "saved_MB_local"]
    ctx.log.info("\n%s", report.table(rows, columns))
    if skipped:
        ctx.log.info("world sizes %s skipped: the job has only %d ranks", skipped, ctx.world_size)


def _plot(run_dir, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["world_size"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4.5), squeeze=False)
    for ax, w in zip(axes[0], sizes, strict=True):
        sel = [r for r in rows if r["world_size"] == w]
        labels = [f"{r['shape']}\n{r['format'][:2]} {r['dtype'][:4]}" for r in sel]
        xs = range(len(sel))
        width = 0.27
        ax.bar([i - width for i in xs], [r["syncbn"] for r in sel], width, label="syncbn")
        ax.bar(xs, [r["local"] + r["comm"] for r in sel], width, label="local + comm (floor)")
        ax.bar([i + width for i in xs], [r["naive"] for r in sel], width, label="naive")
        ax.set_xticks(list(xs), labels, rotation=90, fontsize=6)
        ax.set_ylabel("ms per forward+backward (median)")
        ax.set_title(f"world size {w}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "bench.png", dpi=110)
    plt.close(fig)
