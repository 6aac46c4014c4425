"""task=train: the main job. DDP + SyncBN (or plain BN) on a sharded dataset, held-out evaluation each epoch.

Rank 0 writes metrics.jsonl, checkpoints/last.pt (atomically, every train.checkpoint_every steps and at each
epoch end), summary.json and curves.png; a restarted group resumes from the checkpoint without losing a step.
"""

from __future__ import annotations

import io
import logging
import math
import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from syncbn import convert_sync_batchnorm

from . import report
from .worker import Context, sync_group


def build_model(ctx: Context) -> torch.nn.Module:
    torch.manual_seed(ctx.cfg["seed"])  # same initial weights everywhere (DDP also broadcasts them)
    model = instantiate(ctx.cfg["model"])
    if ctx.cfg["norm"]["name"] == "syncbn":
        model = convert_sync_batchnorm(model, process_group=sync_group(ctx))
    return model.to(ctx.device)


def _save_checkpoint(ctx: Context, state: dict[str, Any]) -> None:
    path = ctx.run_dir / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    report.atomic_write_bytes(path, buffer.getvalue())


def _load_checkpoint(ctx: Context) -> dict[str, Any] | None:
    """The checkpoint to resume from, identical on every rank (rank 0 reads it and broadcasts it).

    Resumes after an elastic restart (TORCHELASTIC_RESTART_COUNT > 0) or with train.resume=true, so a
    reused run directory never resumes an unrelated job by accident.
    """
    if not (ctx.restart_count > 0 or ctx.cfg["train"]["resume"]):
        return None
    box: list = [None]
    if ctx.is_main:
        path = ctx.run_dir / "checkpoints" / "last.pt"
        box[0] = torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
    dist.broadcast_object_list(box, src=0)  # one decision for all ranks, whatever each node's disk shows
    state = box[0]
    if state is not None and state["world_size"] != ctx.world_size:
        raise RuntimeError(
            f"checkpoint was written by {state['world_size']} ranks but this job has {ctx.world_size}; "
            "its per-rank sampler position cannot be mapped (start a new run, or use the same world size)"
        )
    return state


@torch.no_grad()
def evaluate(ctx: Context, model: torch.nn.Module, dataset) -> tuple[float, float]:
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


def train(ctx: Context) -> None:
    cfg, tcfg = ctx.cfg, ctx.cfg["train"]
    start = time.perf_counter()
    train_set, test_set = instantiate(cfg["data"]["train"]), instantiate(cfg["data"]["test"])
    model = build_model(ctx)
    ddp = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    # Padding (drop_last=False) gives every rank the same number of steps: SyncBN needs all ranks each step.
    sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=cfg["seed"])
    loader = DataLoader(train_set, batch_size=tcfg["batch_size"], sampler=sampler)
    steps_per_epoch, epochs = len(loader), tcfg["epochs"]
    total_steps = steps_per_epoch * epochs
    opt = torch.optim.SGD(
        model.parameters(), lr=tcfg["lr"], momentum=tcfg["momentum"], weight_decay=tcfg["weight_decay"]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, total_steps)))
    )

    step, epoch, skip, elapsed = 0, 0, 0, 0.0
    resumed_from: list[int] = []  # the steps this run resumed at, after each restart
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # this epoch: loss, correct, count
    state = _load_checkpoint(ctx)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, epoch, skip, elapsed = state["step"], state["epoch"], state["batch_in_epoch"], state["seconds"]
        sums = (
            state["epoch_sums"][ctx.rank].to(ctx.device).clone()
            if ctx.rank < len(state["epoch_sums"])
            else sums
        )
        torch.set_rng_state(state["rng_cpu"])
        resumed_from = [*state.get("resumed_from", []), step]
        ctx.log.info("resumed from checkpoint at step %d (epoch %d, batch %d)", step, epoch, skip)

    def checkpoint(batch_in_epoch: int) -> None:
        gathered = [torch.zeros_like(sums) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, sums)  # every rank's partial epoch sums, so a resume loses nothing
        if ctx.is_main:
            _save_checkpoint(
                ctx,
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "step": step,
                    "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch,
                    "seconds": elapsed + time.perf_counter() - start,
                    "epoch_sums": [t.cpu() for t in gathered],
                    "world_size": ctx.world_size,
                    "resumed_from": resumed_from,
                    "rng_cpu": torch.get_rng_state(),
                },
            )

    progress = _progress(ctx, total_steps, step)
    while epoch < epochs:
        sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            if i < skip:
                continue  # already trained before the restart
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            _inject_fault(ctx, model, step + 1)
            logits = ddp(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            sums += torch.stack(
                [loss.detach() * len(y), (logits.argmax(1) == y).sum(), torch.tensor(len(y))]
            ).to(sums)
            progress.update(1)
            if tcfg["checkpoint_every"] and step % tcfg["checkpoint_every"] == 0 and i + 1 < steps_per_epoch:
                checkpoint(i + 1)
        skip = 0
        dist.all_reduce(sums)
        test_loss, test_acc = evaluate(ctx, model, test_set)
        row = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": (sums[0] / sums[2]).item(),
            "train_accuracy": (sums[1] / sums[2]).item(),
            "test_loss": test_loss,
            "test_accuracy": test_acc,
            "lr": sched.get_last_lr()[0],
            "seconds": round(elapsed + time.perf_counter() - start, 3),
        }
        epoch += 1
        sums.zero_()
        if ctx.is_main:
            report.append_metrics(ctx.run_dir, row)
            progress.clear()
            ctx.log.info(
                f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} "
                f"acc {row['train_accuracy']:.4f}  test loss {test_loss:.4f} acc {test_acc:.4f}  "
                f"({row['seconds']:.1f}s)"
            )
            progress.refresh()
        checkpoint(0)
    progress.close()
    if ctx.is_main:
        _finish(ctx, step, elapsed + time.perf_counter() - start, resumed_from)


def _inject_fault(ctx: Context, model: torch.nn.Module, step: int) -> None:
    """Recovery drills (config `fault`): break one rank on purpose during the first attempt.

    kill: SIGKILL this worker at the step (the elastic agent must restart the group, which resumes);
    eval: switch this rank to eval mode from the step on (its SyncBN layers stop syncing; the others
    must fail within launcher.timeout_s instead of hanging).
    """
    fault = ctx.cfg["fault"]
    if not fault["kind"] or ctx.rank != fault["rank"] or step != fault["step"] or ctx.restart_count > 0:
        return
    ctx.log.warning("fault injection: %s on rank %d at step %d", fault["kind"], ctx.rank, step)
    if fault["kind"] == "kill":
        for handler in logging.getLogger("syncbn.launch").handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault["kind"] == "eval":
        model.eval()
    else:
        raise ValueError(f"unknown fault.kind {fault['kind']!r} (kill | eval)")


def _progress(ctx: Context, total: int, done: int):
    """A tqdm bar on rank 0 when its console is a terminal; elsewhere a silent stand-in."""
    from tqdm import tqdm

    return tqdm(total=total, initial=done, disable=None if ctx.is_main else True, unit="step", leave=False)


def _finish(ctx: Context, steps: int, seconds: float, resumed_from: list[int]) -> None:
    cfg = ctx.cfg
    rows = report.read_metrics(ctx.run_dir)
    if not rows:
        ctx.log.info("no epoch finished (train.epochs=%s): nothing to summarize", cfg["train"]["epochs"])
        return
    summary = {
        "final_accuracy": rows[-1]["test_accuracy"],
        "best_accuracy": max(r["test_accuracy"] for r in rows),
        "final_loss": rows[-1]["test_loss"],
        "world_size": ctx.world_size,
        "norm": cfg["norm"]["name"],
        "group_size": cfg["syncbn"]["group_size"],
        "batch_size": cfg["train"]["batch_size"],
        "global_batch": cfg["train"]["batch_size"] * ctx.world_size,
        "epochs": cfg["train"]["epochs"],
        "steps": steps,
        "seconds": round(seconds, 3),
        "restarts": ctx.restart_count,
        "resumed_from_steps": resumed_from,
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
        steps,
        seconds,
    )
