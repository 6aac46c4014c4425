"""task=train: the main job. DDP + SyncBN (or plain BN) on a sharded dataset, held-out evaluation each epoch.

Rank 0 writes metrics.jsonl, checkpoints/last.pt (atomically, every task.checkpoint_every steps and at each
epoch end), summary.json and curves.png; a restarted group resumes from the checkpoint without losing a step,
at the same or another world size (the data position and the learning rate follow global samples).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset

from syncbn import convert_sync_batchnorm

from . import checkpoint, report
from .checkpoint import TrainState
from .fault import inject_fault
from .models import compile_model
from .runtime import Context, snapshot, sync_group
from .sampler import Indexed, ResumableSampler


def build_model(ctx: Context) -> torch.nn.Module:
    """The configured model on this rank's device, its BatchNorms converted when norm=syncbn."""
    torch.manual_seed(ctx.cfg["seed"])  # same initial weights everywhere (DDP also broadcasts them)
    model = instantiate(ctx.cfg["model"])
    if ctx.cfg["norm"]["name"] == "syncbn":
        model = convert_sync_batchnorm(model, process_group=sync_group(ctx))
    return model.to(ctx.device)


def _optimizer(model: torch.nn.Module, settings: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(),
        lr=settings["lr"],
        momentum=settings["momentum"],
        weight_decay=settings["weight_decay"],
    )


def _lr(state: TrainState, base: float) -> float:
    """Cosine schedule over the run's samples (not steps: a restart at another world size keeps it)."""
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, state.progress())))


def train(ctx: Context) -> None:
    settings = ctx.task
    train_set, test_set = instantiate(ctx.cfg["data"]["train"]), instantiate(ctx.cfg["data"]["test"])
    model = build_model(ctx)
    ddp = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if settings["compile"]:  # the DDP module, as torch recommends: its gradient buckets bound the graphs
        ddp = compile_model(ddp, ctx.device)
    run = checkpoint.run_record(ctx.cfg, ctx.world_size, len(train_set))
    state = TrainState(model, _optimizer(model, settings), run, ctx.device)
    checkpoint.resume(ctx, state)  # may refuse (on every rank) before anything is written
    snapshot(ctx)
    state.world_sizes.append(ctx.world_size)
    sampler = ResumableSampler(len(train_set), ctx.world_size, ctx.rank, ctx.cfg["seed"])
    loader = DataLoader(Indexed(train_set), batch_size=settings["batch_size"], sampler=sampler)
    progress = _progress(ctx, state, sampler)
    samples = _samples_log(ctx, state) if settings["log_samples"] else None
    while state.epoch < settings["epochs"]:
        # Padding (drop_last=False) gives every rank the same number of steps: SyncBN needs all ranks.
        sampler.set_epoch(state.epoch, start=state.samples_in_epoch)
        _train_epoch(ctx, state, ddp, loader, progress, samples)
        _end_epoch(ctx, state, test_set, progress)
    progress.close()
    if ctx.is_main:
        _finish(ctx, state)


def _train_epoch(ctx: Context, state: TrainState, ddp, loader: DataLoader, progress, samples) -> None:
    """The rest of the current epoch (the sampler starts where a resumed checkpoint stopped)."""
    settings = ctx.task
    for i, (x, y, index) in enumerate(loader):
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        inject_fault(ctx, settings["fault"], state.model, state.step + 1)
        for group in state.optimizer.param_groups:
            group["lr"] = _lr(state, settings["lr"])
        logits = ddp(x)
        loss = F.cross_entropy(logits, y)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.record_batch(loss, logits, y)
        if samples is not None:
            samples(index)
        progress.update(1)
        every = settings["checkpoint_every"]
        if every and state.step % every == 0 and i + 1 < len(loader):
            checkpoint.save(ctx, state)  # mid-epoch; the epoch's end writes its own


def _samples_log(ctx: Context, state: TrainState):
    """task.log_samples: each rank appends the dataset indices of every step to samples/, one file per
    worker process (attempts and ranks apart), to audit what a resume skipped or repeated."""
    path = ctx.run_dir / "samples" / f"rank{ctx.rank}-pid{os.getpid()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    attempt = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "started": time.time(),
        "from_step": state.step,
    }

    def log(index: torch.Tensor) -> None:
        row = {**attempt, "epoch": state.epoch, "step": state.step, "time": time.time()}
        report.append_jsonl(path, row | {"indices": index.tolist()})

    return log


def _end_epoch(ctx: Context, state: TrainState, test_set: Dataset, progress) -> None:
    """Reduce the epoch's metrics, evaluate, log a row of metrics.jsonl, checkpoint."""
    sums = state.epoch_sums.clone()
    dist.all_reduce(sums)
    test_loss, test_acc = evaluate(ctx, state.model, test_set)
    row = {
        "epoch": state.epoch + 1,
        "step": state.step,
        "train_loss": (sums[0] / sums[2]).item(),
        "train_accuracy": (sums[1] / sums[2]).item(),
        "test_loss": test_loss,
        "test_accuracy": test_acc,
        "lr": _lr(state, ctx.task["lr"]),  # for the next step
        "seconds": round(state.elapsed(), 3),
    }
    state.finish_epoch()
    if ctx.is_main:
        report.append_metrics(ctx.run_dir, row)
        progress.clear()
        ctx.log.info(
            f"epoch {row['epoch']}/{ctx.task['epochs']}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_accuracy']:.4f}  test loss {test_loss:.4f} acc {test_acc:.4f}  "
            f"({row['seconds']:.1f}s)"
        )
        progress.refresh()
    checkpoint.save(ctx, state)


@torch.no_grad()
def evaluate(ctx: Context, model: torch.nn.Module, dataset: Dataset) -> tuple[float, float]:
    """(mean loss, accuracy) on the held-out split; each rank takes every W-th example, no padding."""
    model.eval()  # running statistics: no collective in any BatchNorm
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss, correct, count
    for x, y in DataLoader(shard, batch_size=256):
        x, y = x.to(ctx.device), y.to(ctx.device)
        logits = model(x)
        sums[0] += F.cross_entropy(logits, y, reduction="sum")
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)
    dist.all_reduce(sums)
    model.train()
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def _progress(ctx: Context, state: TrainState, sampler: ResumableSampler):
    """A tqdm bar on rank 0 when its console is a terminal; elsewhere a silent stand-in."""
    from tqdm import tqdm

    def steps(start: int) -> int:  # of an epoch from ``start`` global samples in, at this world size
        return math.ceil(math.ceil((sampler.size - start) / ctx.world_size) / ctx.task["batch_size"])

    epochs_after = max(0, ctx.task["epochs"] - state.epoch - 1)
    left = steps(min(state.samples_in_epoch, sampler.size)) + epochs_after * steps(0)
    total = state.step + (left if state.epoch < ctx.task["epochs"] else 0)
    return tqdm(
        total=total, initial=state.step, disable=None if ctx.is_main else True, unit="step", leave=False
    )


def _finish(ctx: Context, state: TrainState) -> None:
    """summary.json, curves.png and the console table, from the metrics of every epoch."""
    cfg, settings, seconds = ctx.cfg, ctx.task, state.elapsed()
    rows = report.read_metrics(ctx.run_dir)
    if not rows:
        ctx.log.info("no epoch finished (task.epochs=%s): nothing to summarize", settings["epochs"])
        return
    summary = {
        "final_accuracy": rows[-1]["test_accuracy"],
        "best_accuracy": max(r["test_accuracy"] for r in rows),
        "final_loss": rows[-1]["test_loss"],
        "world_size": ctx.world_size,
        "world_sizes": state.world_sizes,  # of every attempt that trained (elastic membership changes)
        "norm": cfg["norm"]["name"],
        "group_size": cfg["norm"].get("group_size"),
        "batch_size": settings["batch_size"],
        "global_batch": settings["batch_size"] * ctx.world_size,
        "epochs": settings["epochs"],
        "steps": state.step,
        "seconds": round(seconds, 3),
        "restarts": ctx.restart_count,
        "resumed_from_steps": state.resumed_from,
        "device": str(ctx.device.type),
        "backend": ctx.backend,
    }
    report.write_summary(ctx.run_dir, summary)
    title = f"{summary['norm']}, {ctx.world_size} ranks x batch {summary['batch_size']}"
    report.plot_curves(ctx.run_dir, rows, title)
    columns = ["epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"]
    ctx.log.info("\n%s", report.table(rows, columns))
    ctx.log.info(
        "final test accuracy %.4f (%s, world size %d, %d steps, %.1fs)",
        summary["final_accuracy"],
        summary["norm"],
        ctx.world_size,
        state.step,
        seconds,
    )
