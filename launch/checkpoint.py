"""Training state and its checkpoint: one object (TrainState) with state_dict()/load_state_dict(), and the
rules for resuming from run_dir/checkpoints/last.pt.

Where the data stands is kept as global samples consumed in the current epoch (launch/sampler.py: valid at
any world size). The checkpoint records what its step count depends on (world size, batch size, dataset
size, epochs, seed) and the job that wrote it; a resume either continues exactly or is refused with one
line naming the settings that differ. A different world size is not refused: see resume().
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import report
from .config import ConfigError
from .runtime import Context, on_main

# What a position in the run means: the record keys compared on resume, as the user spells them.
RESUME_KEYS = {
    "batch_size": "task.batch_size",
    "dataset_size": "data.train size",
    "epochs": "task.epochs",
    "seed": "seed",
}


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read; the message names the file."""


def run_record(cfg: dict[str, Any], world_size: int, dataset_size: int) -> dict[str, int]:
    """What the run's step count depends on; every checkpoint carries it."""
    return {
        "world_size": world_size,
        "batch_size": cfg["task"]["batch_size"],
        "dataset_size": dataset_size,
        "epochs": cfg["task"]["epochs"],
        "seed": cfg["seed"],
    }


class TrainState:
    """Model, optimizer and where training stands; a checkpoint is its state_dict()."""

    def __init__(self, model: torch.nn.Module, optimizer, run: dict[str, int], device) -> None:
        self.model, self.optimizer, self.run = model, optimizer, run
        self.world_size = run["world_size"]  # this attempt's; the checkpoint may come from another
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epochs finished
        self.samples_in_epoch = 0  # global samples consumed in the current epoch (all ranks, padding too)
        self.seconds = 0.0  # training time of earlier attempts
        self.resumed_from: list[int] = []  # the step of every resume
        self.world_sizes: list[int] = []  # the world size of every attempt that trained
        # This rank's (loss sum, correct, count) in the current epoch; a checkpoint holds the sum over ranks.
        self.epoch_sums = torch.zeros(3, dtype=torch.float64, device=device)
        self._started = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of training so far, earlier attempts included."""
        return self.seconds + time.perf_counter() - self._started

    def progress(self) -> float:
        """Fraction of the run's samples trained on (the learning-rate schedule's clock): unlike a step
        count, it means the same thing at every world size."""
        size, epochs = self.run["dataset_size"], self.run["epochs"]
        return (self.epoch * size + min(self.samples_in_epoch, size)) / max(1, epochs * size)

    def record_batch(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Count one optimizer step; every rank had a batch of len(target) (the sampler pads to that)."""
        self.step += 1
        self.samples_in_epoch += len(target) * self.world_size
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
            "step": self.step,
            "epoch": self.epoch,
            "samples_in_epoch": self.samples_in_epoch,
            "seconds": self.elapsed(),
            "resumed_from": list(self.resumed_from),
            "world_sizes": list(self.world_sizes),
            "epoch_sums": self.epoch_sums.cpu(),
            "run": dict(self.run),
            "rng_cpu": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore everything but the run record: that stays this attempt's (resume() compares them)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.samples_in_epoch, self.seconds = state["samples_in_epoch"], state["seconds"]
        self.resumed_from = list(state["resumed_from"])
        self.world_sizes = list(state["world_sizes"])
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
    payload["job"] = ctx.job  # which job wrote it: its own restarts resume without being asked
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path(ctx.run_dir).parent.mkdir(parents=True, exist_ok=True)
    report.atomic_write_bytes(path(ctx.run_dir), buffer.getvalue())


def load(file: Path) -> dict[str, Any]:
    """The checkpoint's contents, or CheckpointError naming the file and what is wrong with it."""
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own text would suggest weights_only=False: never for a damaged file
        reason = {
            "UnpicklingError": "not a torch checkpoint, or it holds objects other than tensors and numbers",
            "EOFError": "the file is empty",
        }.get(type(e).__name__) or (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(
            f"cannot read checkpoint {file}: {reason}; move it away to start over"
        ) from None
    if not isinstance(payload, dict) or not {"model", "optimizer", "step"} <= set(payload):
        raise CheckpointError(f"{file} is not a syncbn training checkpoint (no model, optimizer and step)")
    return payload


def check_compatible(file: Path, saved: dict[str, int] | None, current: dict[str, int]) -> None:
    """ConfigError naming every setting that differs between the checkpoint's run record and this run's."""
    if saved is None:
        raise ConfigError(
            f"cannot resume from {file}: it records no batch size, dataset size, epochs or seed"
        )
    differ = [
        f"{label} {saved.get(key)} -> {current[key]}"
        for key, label in RESUME_KEYS.items()
        if saved.get(key) != current[key]
    ]
    if differ:
        raise ConfigError(
            f"cannot resume from {file}: its step count depends on settings this run changes "
            f"({', '.join(differ)}; checkpoint -> now); use the checkpoint's values or a new run directory"
        )


def resumable(
    run_dir: Path, current: dict[str, int], *, explicit: bool, job: str | None = None
) -> dict[str, Any] | None:
    """The checkpoint in ``run_dir`` if this run can resume from it; None if there is none.

    ConfigError if ``explicit`` (task.resume=true) and there is none; if it is another job's than ``job``
    (None: do not ask) and the resume is not explicit; if it was written with other settings.
    CheckpointError if it cannot be read. Reads only: a refused resume changes nothing.
    """
    file = path(run_dir)
    if not file.exists():
        if explicit:
            raise ConfigError(f"task.resume=true but there is no checkpoint to resume: {file} does not exist")
        return None
    payload = load(file)
    if job is not None and payload.get("job") != job and not explicit:
        raise ConfigError(
            f"{run_dir} holds another job's checkpoint ({payload['step']} steps); pass task.resume=true "
            "to continue it, or use a new run directory"
        )
    check_compatible(file, payload.get("run"), current)
    return payload


def resume(ctx: Context, state: TrainState) -> bool:
    """Load the checkpoint into ``state`` if this run should resume; True if it did.

    A run resumes its own job's checkpoint (after an elastic restart or a change of membership, the world
    size may differ: the position is in global samples) or, with task.resume=true, any compatible one. A
    checkpoint of another job without task.resume=true is refused, so a run directory is never overwritten
    by accident. Rank 0 decides and reads the file; every rank gets the same state or the same error.
    """
    explicit = bool(ctx.task["resume"])
    payload = on_main(ctx, lambda: resumable(ctx.run_dir, state.run, explicit=explicit, job=ctx.job))
    if payload is None:
        return False
    if not ctx.is_main:  # rank 0 carries the sums of every rank; the epoch-end all-reduce adds the rest
        payload["epoch_sums"] = torch.zeros_like(payload["epoch_sums"])
    state.load_state_dict(payload)
    state.resumed_from.append(state.step)
    ctx.log.info(
        "resumed from checkpoint at step %d (epoch %d, %d samples in), written by %d ranks, now %d",
        state.step,
        state.epoch,
        state.samples_in_epoch,
        payload["run"]["world_size"],
        ctx.world_size,
    )
    return True
