"""Training state and its checkpoint: one object (TrainState) with state_dict()/load_state_dict().

Rank 0 writes run_dir/checkpoints/last.pt atomically; on resume rank 0 reads it and broadcasts it, so every
rank restores the same state. Where the data stands is kept as global samples consumed in the current epoch
(the sampler's global order does not depend on the world size); this version resumes only with the world
size and batch size that wrote the checkpoint.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import report
from .runtime import Context


class TrainState:
    """Model, optimizer, scheduler and where training stands; a checkpoint is its state_dict()."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, world_size: int, device) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.world_size = world_size
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epochs finished
        self.samples_in_epoch = 0  # global samples consumed in the current epoch (all ranks, padding too)
        self.seconds = 0.0  # training time of earlier attempts
        self.resumed_from: list[int] = []  # the step of every resume
        # This rank's (loss sum, correct, count) in the current epoch; a checkpoint holds the sum over ranks.
        self.epoch_sums = torch.zeros(3, dtype=torch.float64, device=device)
        self._started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of training so far, earlier attempts included."""
        return self.seconds + time.perf_counter() - self._started

    def batches_done(self, batch_size: int) -> int:
        """Batches of the current epoch every rank has already trained on."""
        per_batch = batch_size * self.world_size
        if self.samples_in_epoch % per_batch:
            raise RuntimeError(
                f"checkpoint position {self.samples_in_epoch} samples into epoch {self.epoch} is not a "
                f"whole number of global batches of {per_batch} (batch size {batch_size} x {self.world_size} "
                "ranks); resume with the batch size that wrote it"
            )
        return self.samples_in_epoch // per_batch

    def record_batch(
        self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, batch_size: int
    ) -> None:
        """Count one optimizer step on a global batch of ``batch_size`` x world size samples."""
        self.step += 1
        self.samples_in_epoch += batch_size * self.world_size
        n = len(target)
        # In place on the sums' own device, in float64: no host tensor to mix with device ones, no sync.
        self.epoch_sums[0].add_(loss.detach(), alpha=n)
        self.epoch_sums[1].add_((logits.argmax(1) == target).sum())
        self.epoch_sums[2].add_(n)

    def finish_epoch(self) -> None:
        """The epoch is done: the data position and the epoch's metrics start over."""
        self.epoch += 1
        self.samples_in_epoch = 0
        self.epoch_sums.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "seconds": self.elapsed(),
            "resumed_from": list(self.resumed_from),
            "epoch_sums": self.epoch_sums.cpu(),
            "world_size": self.world_size,
            "rng_cpu": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            raise RuntimeError(
                f"checkpoint was written by {state['world_size']} ranks but this job has {self.world_size}; "
                "its per-rank optimizer and data position cannot be mapped (start a new run, or use the "
                "same world size)"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.samples_in_epoch, self.seconds = state["samples_in_epoch"], state["seconds"]
        self.resumed_from = list(state["resumed_from"])
        self.epoch_sums.copy_(state["epoch_sums"])
        torch.set_rng_state(state["rng_cpu"])


def path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.pt"


def _on_cpu(obj: Any) -> Any:
    """``obj`` (nested dicts, lists, tuples) with every tensor copied to host memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: _on_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(value) for value in obj)
    return obj


def save(ctx: Context, state: TrainState) -> None:
    """Write the checkpoint (every rank calls this: the epoch's partial sums are summed over ranks)."""
    totals = state.epoch_sums.clone()
    dist.all_reduce(totals)  # every rank's partial epoch sums, so a resumed epoch's metrics lose nothing
    if not ctx.is_main:
        return
    payload = _on_cpu(state.state_dict())  # a checkpoint written on GPUs loads on any machine
    payload["epoch_sums"] = totals.cpu()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path(ctx.run_dir).parent.mkdir(parents=True, exist_ok=True)
    report.atomic_write_bytes(path(ctx.run_dir), buffer.getvalue())


def resume(ctx: Context, state: TrainState) -> bool:
    """Load the checkpoint into ``state`` if this run should resume; True if it did.

    Resumes after an elastic restart (TORCHELASTIC_RESTART_COUNT > 0) or with task.resume=true, so a reused
    run directory never resumes an unrelated job by accident. Rank 0 reads the file and broadcasts it: one
    decision for all ranks, whatever each node's disk shows.
    """
    if not (ctx.restart_count > 0 or ctx.task["resume"]):
        return False
    box: list = [None]
    if ctx.is_main and path(ctx.run_dir).exists():
        box[0] = torch.load(path(ctx.run_dir), map_location="cpu", weights_only=True)
    dist.broadcast_object_list(box, src=0)
    payload = box[0]
    if payload is None:
        return False
    if not ctx.is_main:  # rank 0 carries the sums of every rank; the epoch-end all-reduce adds the rest
        payload["epoch_sums"] = torch.zeros_like(payload["epoch_sums"])
    state.load_state_dict(payload)
    state.resumed_from.append(state.step)
    ctx.log.info(
        "resumed from checkpoint at step %d (epoch %d, %d samples in)",
        state.step,
        state.epoch,
        state.samples_in_epoch,
    )
    return True
