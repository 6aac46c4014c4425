"""task=bench: a SyncBN step next to local BatchNorm, the communication floor and a naive SyncBN.

    python -m launch.run task=bench launcher.nproc_per_node=2 task.world_sizes=[2]

Per rank, median forward+backward time of one layer, measured interleaved (A B C ... A B C ...) so drift
hits every variant alike; every variant starts after a barrier, so a late peer is nobody's cost:
  syncbn  ours, training mode             local   F.batch_norm on the same local batch, no sync
  comm    bare all-reduces of 2C+1 and 2C float64, back to back
  exchange  the layer's two payloads (2C+5 float64 each) summed as the layer sums them, back to back
          (syncbn.comms.all_reduce_sum: a direct exchange on gloo groups of up to 8 ranks, over same-host
          links when the ranks share a machine)
  insitu  local forward, all-reduce of 2C+1 float64, local backward, all-reduce of 2C float64: the floor
          timed like our step, so it pays the same in-step waits any synchronous SyncBN pays
  naive   autograd SyncBN (count all-reduce, then sums; autograd backward)
  torch   torch.nn.SyncBatchNorm (CUDA only; at world size 1 both synced paths: see launch/bench_cuda.py)
  compiled  ours under torch.compile (task.compile; world size 2, float32 rows), compile_s its first call
floor_ratio = syncbn / (local + comm); exchange_ratio = syncbn / (local + exchange), the floor on the
layer's own transport (bare, so without in-step waits); insitu_ratio = syncbn / insitu;
naive_speedup = naive / syncbn; compiled_speedup = syncbn / compiled; ops = ATen ops one layer step
dispatches (torch.profiler, top level). Then one training step of the configured model (DDP + SGD)
with task.network_images images per rank: syncbn vs bn vs naive, and with task.compile at world size 2
syncbn_compiled and bn_compiled.
On CUDA each row also counts the GPU kernels and host syncs of one step of every variant.
"""

from __future__ import annotations

import copy
import csv
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from syncbn import SyncBatchNorm, comms, convert_sync_batchnorm
from syncbn.testing import aten_ops

from . import bench_cuda
from .models import compile_model
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


class NaiveSyncBatchNorm(nn.Module):
    """:func:`naive_sync_bn` as a layer (no running statistics), for the whole-network figure."""

    def __init__(self, bn: nn.Module, group) -> None:
        super().__init__()
        self.weight, self.bias, self.eps, self.group = bn.weight, bn.bias, bn.eps, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return naive_sync_bn(x, self.weight, self.bias, self.group, self.eps)


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


def _inputs(ctx: Context, case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (x, dy) for the case: seeded by rank, in the case's dtype and memory format."""
    torch.manual_seed(ctx.rank)
    dtype, fmt = DTYPES[case["dtype"]], torch.contiguous_format
    if case["format"] == "channels_last":
        fmt = torch.channels_last
    x = torch.randn(case["shape"], device=ctx.device, dtype=dtype).contiguous(memory_format=fmt)
    dy = torch.randn(case["shape"], device=ctx.device, dtype=dtype).contiguous(memory_format=fmt)
    return x.requires_grad_(True), dy


def _variants(
    ctx: Context, x, dy, group, world: int, compiled: bool
) -> tuple[dict, dict, Callable[[], None]]:
    """Every variant's timed step, its forward alone (for the memory figure), and a grad reset."""
    c, dev = x.shape[1], ctx.device
    weight = torch.ones(c, device=dev, requires_grad=True)
    bias = torch.zeros(c, device=dev, requires_grad=True)
    ours = SyncBatchNorm(c, process_group=group, device=dev)
    theirs = SyncBatchNorm(c, process_group=group, device=dev)  # compiled (if compiled)
    rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
    # The communication floor, in float64 like the layer's payloads
    fwd_stats = torch.zeros(2 * c + 1, dtype=torch.float64, device=dev)
    bwd_stats = torch.zeros(2 * c, dtype=torch.float64, device=dev)
    payloads = torch.zeros(2, 2 * c + 5, dtype=torch.float64, device=dev).unbind()

    def local():
        return F.batch_norm(x, rm, rv, weight, bias, True, 0.1, 1e-5)

    def comm():
        if world > 1:
            dist.all_reduce(fwd_stats, group=group)
            dist.all_reduce(bwd_stats, group=group)

    def exchange():
        if world > 1:
            for payload in payloads:
                comms.all_reduce_sum(payload, group)

    def insitu():
        y = local()
        if world > 1:
            dist.all_reduce(fwd_stats, group=group)
        y.backward(dy)
        if world > 1:
            dist.all_reduce(bwd_stats, group=group)

    def clear():
        for t in (x, weight, bias, ours.weight, ours.bias, theirs.weight, theirs.bias):
            t.grad = None

    forwards = {
        "syncbn": lambda: ours(x),
        "local": local,
        "naive": lambda: naive_sync_bn(x, weight, bias, group),
    }
    variants = {
        "syncbn": lambda: forwards["syncbn"]().backward(dy),
        "local": lambda: local().backward(dy),
        "comm": comm,
        "exchange": exchange,
        "insitu": insitu,
        "naive": lambda: forwards["naive"]().backward(dy),
    }
    if compiled:
        run = compile_model(theirs, dev)
        variants["compiled"] = lambda: run(x).backward(dy)
    if dev.type == "cuda":
        variants.update(bench_cuda.torch_variants(x, dy, group, world))
    return variants, forwards, clear


def time_interleaved(
    variants: dict[str, Callable[[], Any]],
    device: torch.device,
    group,
    world: int,
    *,
    rounds: int,
    warmup: int,
    after: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Median milliseconds per call of each variant, interleaved; the max over the group's ranks.

    Each call starts after a barrier (a late peer is not the variant's cost); ``after`` runs untimed
    after every call (to clear gradients). ``<name>_cpu``: the rank process's CPU time (all its threads:
    gloo's workers do an allreduce's work, the calling thread an exchange's), which leaves out the waits
    for the other ranks and the network (on a VM they dominate small steps' wall time).
    """
    times: dict[str, list[float]] = {key: [] for name in variants for key in (name, f"{name}_cpu")}
    for i in range(warmup + rounds):
        for name, fn in variants.items():
            if world > 1:
                dist.barrier(group=group)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
                times[f"{name}_cpu"].append(time.process_time() - c0)
            if after is not None:
                after()
    medians = [statistics.median(ts) * 1e3 for ts in times.values()]
    # A step is as slow as the slowest rank: take the max of the medians over the group.
    packed = torch.tensor(medians, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    return dict(zip(times, packed.tolist(), strict=True))


def _compiles(ctx: Context, world: int, dtype: str = "float32") -> bool:
    return bool(ctx.task["compile"]) and world == 2 and dtype == "float32"


def _first_call_seconds(fn: Callable[[], Any], after: Callable[[], None] | None = None) -> float:
    """Seconds of the untimed first call of a compiled variant (its compile), so warm-up rounds are fair."""
    start = time.perf_counter()
    fn()
    if after is not None:
        after()
    return round(time.perf_counter() - start, 2)


def _time_case(ctx: Context, case: dict, group, world: int, rounds: int, warmup: int) -> dict[str, Any]:
    """One layer row: times, ratios, ATen ops per step and saved-for-backward memory."""
    x, dy = _inputs(ctx, case)
    compiled = _compiles(ctx, world, case["dtype"])
    variants, forwards, clear = _variants(ctx, x, dy, group, world, compiled)
    compile_s = _first_call_seconds(variants["compiled"], clear) if compiled else None
    ms = time_interleaved(variants, ctx.device, group, world, rounds=rounds, warmup=warmup, after=clear)
    if ctx.device.type == "cuda":  # every rank of the group profiles the same variants in the same order
        clear()
        ms.update(bench_cuda.figures(ms, variants, ctx.device, leaves=(x,)))
    row: dict[str, Any] = {
        "world_size": world,
        "shape": "x".join(map(str, case["shape"])),
        "format": case["format"],
        "dtype": case["dtype"],
        **{k: round(v, 4) for k, v in ms.items()},
        "floor_ratio": round(ms["syncbn"] / (ms["local"] + ms["comm"]), 3),
        "exchange_ratio": round(ms["syncbn"] / (ms["local"] + ms["exchange"]), 3),
        "insitu_ratio": round(ms["syncbn"] / ms["insitu"], 3),
        "naive_speedup": round(ms["naive"] / ms["syncbn"], 3),
        # what the layer itself adds to the floor, in CPU time of the rank process (no waits)
        "cpu_overhead": round(ms["syncbn_cpu"] - ms["insitu_cpu"], 4),
    }
    if compiled:
        row.update(compiled_speedup=round(ms["syncbn"] / ms["compiled"], 3), compile_s=compile_s)
    for name in ("syncbn", "local", "naive"):
        clear()
        row[f"ops_{name}"] = len(aten_ops(variants[name]))  # collective: every rank of the group profiles
    clear()
    for name, forward in forwards.items():
        row[f"saved_MB_{name}"] = round(saved_bytes(forward) / 2**20, 4)
    return row


def _naive_copy(model: nn.Module, group) -> nn.Module:
    """A copy of ``model`` with every BatchNorm replaced by :class:`NaiveSyncBatchNorm`."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, NaiveSyncBatchNorm(child, group))
    return model


def _network_step(
    ctx: Context, model: nn.Module, group, images: torch.Tensor, labels: torch.Tensor, compiled: bool = False
):
    """One training step of ``model`` under DDP with SGD (compiled as task.compile does): a user's step."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=ids, process_group=group)
    if compiled:
        ddp = compile_model(ddp, ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(images), labels).backward()
        opt.step()

    return step


def _time_network(ctx: Context, group, world: int, per_rank: int, rounds: int, warmup: int) -> dict:
    """One row of the whole-network figure: the configured model, ``per_rank`` images on each rank."""
    from hydra.utils import instantiate

    data = instantiate(ctx.cfg["data"]["train"])
    picks = [data[i] for i in range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)]
    images = torch.stack([p[0] for p in picks]).to(ctx.device)
    labels = torch.stack([torch.as_tensor(p[1]) for p in picks]).to(ctx.device)
    torch.manual_seed(ctx.cfg["seed"])
    base = instantiate(ctx.cfg["model"]).to(ctx.device)
    models = {
        "syncbn": convert_sync_batchnorm(copy.deepcopy(base), group),
        "bn": copy.deepcopy(base),
        "naive": _naive_copy(base, group),
    }
    steps = {name: _network_step(ctx, m, group, images, labels) for name, m in models.items()}
    compile_s = {}
    if _compiles(ctx, world):
        for name, model in (("syncbn", convert_sync_batchnorm(copy.deepcopy(base), group)), ("bn", base)):
            steps[f"{name}_compiled"] = _network_step(ctx, model, group, images, labels, compiled=True)
            compile_s[f"compile_s_{name}"] = _first_call_seconds(steps[f"{name}_compiled"])
    ms = time_interleaved(steps, ctx.device, group, world, rounds=rounds, warmup=warmup)
    row = {
        "world_size": world,
        "images_per_rank": per_rank,
        **{k: round(v, 3) for k, v in ms.items() if not k.endswith("_cpu")},
        "syncbn_vs_bn": round(ms["syncbn"] / ms["bn"], 3),
        "naive_speedup": round(ms["naive"] / ms["syncbn"], 3),
    }
    if compile_s:
        row.update(compiled_speedup=round(ms["syncbn"] / ms["syncbn_compiled"], 3), **compile_s)
    return row


def _log_row(ctx: Context, row: dict[str, Any]) -> None:
    ctx.log.info(
        "W=%d %-14s %-13s %-8s syncbn %.3f ms  insitu %.3f  local %.3f  comm %.3f  exchange %.3f  "
        "naive %.3f  insitu_ratio %.3f  naive_speedup %.2f  cpu_overhead %.3f  ops %d",
        *(row[k] for k in ("world_size", "shape", "format", "dtype", "syncbn", "insitu", "local", "comm")),
        row["exchange"],
        *(row[k] for k in ("naive", "insitu_ratio", "naive_speedup", "cpu_overhead", "ops_syncbn")),
    )


def bench(ctx: Context) -> None:
    snapshot(ctx)
    cfg = ctx.task
    torch.set_num_threads(cfg["threads"])
    sizes = [w for w in cfg["world_sizes"] if w <= ctx.world_size]
    skipped = [w for w in cfg["world_sizes"] if w > ctx.world_size]
    # new_group is collective over the world: build every group on every rank, in the same order.
    groups = {w: dist.new_group(list(range(w))) for w in sizes}
    rows, network = [], []
    for w in sizes:
        if ctx.rank < w:
            for case in _cases(cfg):
                rows.append(_time_case(ctx, case, groups[w], w, cfg["rounds"], cfg["warmup"]))
                if ctx.is_main:
                    _log_row(ctx, rows[-1])
            for per_rank in cfg["network_images"] if w > 1 else []:
                rounds = cfg["network_rounds"]
                network.append(_time_network(ctx, groups[w], w, per_rank, rounds, cfg["warmup"]))
                if ctx.is_main:
                    ctx.log.info("network step: %s", network[-1])
        dist.barrier()  # ranks outside this world size wait here (make bench raises timeout_s)
    if ctx.is_main:
        _write(ctx, rows, network, skipped)


def _write(ctx: Context, rows: list[dict[str, Any]], network: list[dict], skipped: list[int]) -> None:
    from . import report

    run_dir = ctx.run_dir
    with open(run_dir / "bench.csv", "w", newline="") as f:
        # CUDA rows at world size 1 have columns (synced) that the others lack: the union, in order
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    meta = {
        "device": ctx.device.type,
        "backend": ctx.backend,
        "threads_per_rank": ctx.task["threads"],
        "rounds": ctx.task["rounds"],
        "world_sizes_skipped": skipped,
        "torch": torch.__version__,
        **bench_cuda.device_info(ctx.device),
        "rows": rows,
        "network": network,
    }
    report.write_json(run_dir / "bench.json", meta)
    _plot(run_dir, rows)
    columns = ["world_size", "shape", "format", "dtype", "syncbn", "insitu", "local", "comm", "exchange"]
    columns += ["naive"]
    columns += ["insitu_ratio", "floor_ratio", "exchange_ratio", "naive_speedup"]
    columns += ["syncbn_cpu", "insitu_cpu", "cpu_overhead"]
    columns += ["ops_syncbn", "saved_MB_syncbn"]
    columns += [c for c in bench_cuda.COLUMNS if any(c in row for row in rows)]
    compiled = [row for row in rows if "compiled" in row]
    ctx.log.info("\n%s", report.table(rows, columns))
    if compiled:
        columns = ["world_size", "shape", "format", "syncbn", "compiled", "compiled_speedup", "compile_s"]
        ctx.log.info("\nunder torch.compile (ms per step):\n%s", report.table(compiled, columns))
    if network:
        table = report.table(network, list(dict.fromkeys(k for row in network for k in row)))
        ctx.log.info("\none training step of the model (ms per step):\n%s", table)
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
        ax.bar(xs, [r["insitu"] for r in sel], width, label="in-situ floor")
        ax.bar([i + width for i in xs], [r["naive"] for r in sel], width, label="naive")
        ax.set_xticks(list(xs), labels, rotation=90, fontsize=6)
        ax.set_ylabel("ms per forward+backward (median)")
        ax.set_title(f"world size {w}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "bench.png", dpi=110)
    plt.close(fig)
