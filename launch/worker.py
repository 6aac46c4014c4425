"""What every rank runs: set up logging, device and the process group (with a timeout), then the task.

launch.run starts it through torch's elastic agent with the resolved config; external launchers start it
directly and it composes the config itself:
    torchrun --standalone --nproc_per_node=2 -m launch.worker task=check
    srun torchrun --nnodes=$SLURM_NNODES ... -m launch.worker launcher=multinode task=train
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .config import ConfigError, backend_for, compose, save_config, validate
from .waits import init_failed


@dataclass
class Context:
    """Everything a task needs to know about its place in the job."""

    cfg: dict[str, Any]
    run_dir: Path
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    restart_count: int
    log: logging.Logger

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _logger(run_dir: Path, rank: int) -> logging.Logger:
    log = logging.getLogger("syncbn.launch")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(message)s"))
    log.addHandler(file_handler)
    if rank == 0:  # the console shows rank 0 only; every rank has its file
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(console)
    return logging.LoggerAdapter(log, {"rank": rank})  # type: ignore[return-value]


def _store(world_size: int, restart_count: int, timeout: datetime.timedelta):
    """The rendezvous store for init_process_group, with its keys scoped to this restart attempt.

    The elastic agent keeps one store for the workers across restarts (TORCHELASTIC_USE_AGENT_STORE), but
    env:// does not prefix keys by attempt: restarted workers could read the previous attempt's gloo
    addresses and fail with "connection refused". None (plain env://) when no agent store is shared.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"syncbn/attempt_{restart_count}", client)


def setup(cfg: dict[str, Any], run_dir: Path) -> Context:
    """Read the launcher's environment, pick the device, init the process group with a timeout."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    log = _logger(run_dir, rank)
    # One worker per core share: oversubscribed intra-op threads make every collective wait on stragglers.
    torch.set_num_threads(cfg["threads"] or max(1, (os.cpu_count() or 1) // local_world))
    if cfg["device"] == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = backend_for(cfg)
    timeout = datetime.timedelta(seconds=float(cfg["launcher"]["timeout_s"]))
    restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    try:
        dist.init_process_group(
            backend,
            store=_store(world_size, restart_count, timeout),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
    except RuntimeError as e:  # store or peers unreachable: one line naming both and the fix
        raise init_failed(e, backend, rank, world_size, timeout.total_seconds()) from e
    ctx = Context(
        cfg=cfg,
        run_dir=run_dir,
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        device=device,
        backend=backend,
        restart_count=restart_count,
        log=log,
    )
    log.info(
        "rank %d/%d (local %d) on %s, backend %s, restart %d",
        rank,
        world_size,
        local_rank,
        device,
        backend,
        ctx.restart_count,
    )
    return ctx


def sync_group(ctx: Context):
    """The process group SyncBN layers reduce over: the world, or this rank's block of group_size ranks."""
    size = ctx.cfg["syncbn"]["group_size"]
    if size is None or size == ctx.world_size:
        return None
    if ctx.world_size % size:
        raise ConfigError(f"syncbn.group_size={size} does not divide the world size {ctx.world_size}")
    group, _ = dist.new_subgroups(group_size=size)  # collective: every rank builds every subgroup
    return group


def run_worker(cfg: dict[str, Any], run_dir: str) -> None:
    """Elastic entry point (a picklable function): run the configured task on this rank."""
    ctx = setup(cfg, Path(run_dir))
    if ctx.is_main:
        save_config(cfg, ctx.run_dir)  # one snapshot per job, however many nodes share the run dir
    try:
        name = cfg["task"]["name"]
        if name == "train":
            from .train import train

            train(ctx)
        elif name == "check":
            from .check import check

            check(ctx)
        elif name == "bench":
            from .bench import bench

            bench(ctx)
        else:
            raise ConfigError(f"unknown task {name!r}")
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """Entry for external launchers (torchrun, srun torchrun, Kubeflow): compose the config here."""
    overrides = sys.argv[1:] if argv is None else argv
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        sys.exit(
            "error: launch.worker expects a launcher's environment (RANK, WORLD_SIZE, ...); run it under "
            "torchrun, or start a local job with: python -m launch.run"
        )
    try:
        cfg = compose(overrides)
        validate(cfg, torch.cuda.is_available())
    except ConfigError as e:
        sys.exit(f"error: {e}")
    group_size, world_size = cfg["syncbn"]["group_size"], int(os.environ["WORLD_SIZE"])
    if group_size is not None and world_size % group_size:
        sys.exit(f"error: syncbn.group_size={group_size} does not divide the world size {world_size}")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    run_dir = Path(cfg["run_dir"] or Path("outputs") / "torchrun" / run_id)
    run_worker(cfg, str(run_dir))


if __name__ == "__main__":
    main()
