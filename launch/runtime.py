"""What every rank sets up before its task: logging, device, the process group (with a timeout), sync groups.

Tasks (train, check, bench) import Context and sync_group from here; the worker entry (launch/worker.py)
calls setup() and teardown() around the task. Reads the root keys of the config: device, backend, threads,
timeout_s, and the norm's group_size.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from syncbn import comms

from .config import save_config
from .validate import backend_for, check_group_size
from .waits import init_failed

T = TypeVar("T")


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
    job: str = ""  # the token of the job that claimed run_dir (launch/rundir.py); set by the worker entry

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def task(self) -> dict[str, Any]:
        """This job's task settings (conf/task/<name>.yaml)."""
        return self.cfg["task"]


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


def cuda_device(local_rank: int, local_world: int, backend: str, gpus: int) -> torch.device:
    """This worker's GPU: local rank r takes GPU r % gpus, so gloo workers can share GPUs; NCCL cannot."""
    if gpus < 1:
        raise RuntimeError("device=cuda but no GPU is visible to this worker (check CUDA_VISIBLE_DEVICES)")
    if backend == "nccl" and local_world > gpus:
        raise RuntimeError(
            f"backend nccl needs one GPU per worker: {local_world} workers on this node but {gpus} GPU(s) "
            f"visible; use launcher.nproc_per_node={gpus}, or backend=gloo to let workers share a GPU"
        )
    return torch.device("cuda", local_rank % gpus)


# How much longer than timeout_s the process group's other collectives (DDP's) wait; see setup().
OTHER_COLLECTIVES_GRACE = datetime.timedelta(seconds=5)


def setup(cfg: dict[str, Any], run_dir: Path) -> Context:
    """Read the launcher's environment, pick the device, init the process group with a timeout."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    log = _logger(run_dir, rank)
    # One worker per core share: oversubscribed intra-op threads make every collective wait on stragglers.
    torch.set_num_threads(cfg["threads"] or max(1, (os.cpu_count() or 1) // local_world))
    backend = backend_for(cfg)
    device = torch.device("cpu")
    if cfg["device"] == "cuda":
        device = cuda_device(local_rank, local_world, backend, torch.cuda.device_count())
        torch.cuda.set_device(device)  # NCCL and torch.cuda.synchronize() use the current device
    timeout = datetime.timedelta(seconds=float(cfg["timeout_s"]))
    restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    try:
        dist.init_process_group(
            backend,
            store=_store(world_size, restart_count, timeout),
            rank=rank,
            world_size=world_size,
            # SyncBN's own collectives give up first: when ranks fall out of step (one skips a layer), the
            # error that says why is the first one the agent reports, not DDP's bare timeout on the other.
            timeout=timeout + OTHER_COLLECTIVES_GRACE,
        )
    except RuntimeError as e:  # store or peers unreachable: one line naming both and the fix
        raise init_failed(e, backend, rank, world_size, timeout.total_seconds()) from e
    comms.set_timeout(timeout)  # SyncBN's private process group fails after the same time
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


def snapshot(ctx: Context) -> None:
    """Write the job's config snapshot (rank 0 only), once the task knows it will run: a refused resume
    leaves the run directory as it was. One snapshot per job, however many nodes share the directory."""
    if ctx.is_main:
        save_config(ctx.cfg, ctx.run_dir)


def sync_group(ctx: Context):
    """The process group SyncBN layers reduce over: the world, or this rank's block of group_size ranks."""
    size = ctx.cfg["norm"].get("group_size")
    if size is None or size == ctx.world_size:
        return None
    check_group_size(size, ctx.world_size)  # an elastic job learns its world size only at rendezvous
    group, _ = dist.new_subgroups(group_size=size)  # collective: every rank builds every subgroup
    return group


def teardown() -> None:
    """Leave the process group (every task ends here, failed or not)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def on_main(ctx: Context, decide: Callable[[], T]) -> T:
    """Run ``decide()`` on rank 0 and return its result on every rank; if it raises, every rank raises.

    For decisions that read the run directory (claim it, resume from it): one answer for all ranks,
    whatever each node's disk shows, and no rank left waiting in a collective while another has failed.
    """
    box: list[Any] = [None]
    if ctx.is_main:
        try:
            box[0] = (True, decide())
        except Exception as e:
            # Sent as its class and message (an exception object need not pickle); rank 0 re-raises its own.
            box[0] = (False, (type(e), str(e)))
            error = e
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if ok:
        return value
    if ctx.is_main:
        raise error
    kind, message = value
    try:
        error = kind(message) if issubclass(kind, (ValueError, RuntimeError)) else None
    except TypeError:  # a type that takes other arguments than a message
        error = None
    raise error or RuntimeError(f"rank 0: {kind.__name__}: {message}")
