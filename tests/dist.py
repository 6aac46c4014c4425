"""Multi-process harness: run a function on W gloo ranks (spawned processes) and collect what each returned.

Every rank inits the process group from a file under a per-test folder (no ports) with a hard timeout, and
the parent kills the whole group past its own deadline, so a bug shows as a failure, never a frozen CI.

On a GPU machine the same cases run on CUDA tensors (``make test-gpu`` does this): SYNCBN_TEST_DEVICE=cuda
puts rank r on GPU r % count (tests put their tensors on DEVICE), and SYNCBN_TEST_BACKEND=nccl swaps gloo
for NCCL, which needs a GPU per rank (larger worlds skip).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Where the ranks' tensors live, and the backend between them: CPU and gloo unless a GPU run asks.
DEVICE = os.environ.get("SYNCBN_TEST_DEVICE", "cpu")
BACKEND = os.environ.get("SYNCBN_TEST_BACKEND", "gloo")


@dataclass
class Outcome:
    """What one rank ended with: a returned value, or the exception it raised."""

    rank: int
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None


def _worker(fn, rank, world_size, init_file, result_file, pg_timeout, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    outcome = Outcome(rank)
    try:
        if DEVICE == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())  # "cuda" means this rank's GPU
        dist.init_process_group(
            BACKEND,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        from syncbn import comms

        comms.set_timeout(pg_timeout)  # what the launcher does: SyncBN's private group gets the same
        outcome.value = fn(rank, world_size, *args)
    except BaseException as e:  # report everything, including KeyboardInterrupt from a timeout
        outcome.error_type, outcome.error = type(e).__name__, str(e)
        outcome.traceback = traceback.format_exc()
    finally:
        torch.save(outcome, result_file)
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    tmp_path: Path,
    *args: Any,
    timeout: float = 90.0,
    pg_timeout: float = 30.0,
) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return one Outcome per rank.

    ``fn`` must be importable (module level). Raises AssertionError if a rank is still running after
    ``timeout`` seconds or died without reporting (a process abort).
    """
    import torch

    _check_device(world_size, torch)
    ctx = mp.get_context("spawn")
    run_dir = Path(tmp_path) / f"spawn-{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    init_file = run_dir / "init"
    files = [run_dir / f"rank{r}.pt" for r in range(world_size)]
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, str(init_file), str(files[r]), pg_timeout, args))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    if hung:
        raise AssertionError(f"ranks {hung} of {world_size} still running after {timeout:.0f}s: a hang")
    outcomes = []
    for r, f in enumerate(files):
        if not f.exists():
            raise AssertionError(
                f"rank {r} died without reporting (exit code {procs[r].exitcode}): a process abort"
            )
        outcomes.append(torch.load(f, weights_only=False))
    return outcomes


def _check_device(world_size: int, torch) -> None:
    """Refuse a device or backend this machine cannot give the ranks, before spawning any."""
    if (DEVICE, BACKEND) not in {("cpu", "gloo"), ("cuda", "gloo"), ("cuda", "nccl")}:
        raise ValueError(
            f"SYNCBN_TEST_DEVICE={DEVICE} with SYNCBN_TEST_BACKEND={BACKEND}: use cpu or cuda, and gloo "
            "(nccl only with cuda)"
        )
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SYNCBN_TEST_DEVICE=cuda but torch sees no CUDA device")
    if BACKEND == "nccl" and world_size > torch.cuda.device_count():
        pytest.skip(f"NCCL needs a GPU per rank: {world_size} ranks, {torch.cuda.device_count()} GPU(s)")


def values(outcomes: list) -> list:
    """Per-rank return values; fail with every rank's traceback if any rank raised."""
    failed = [o for o in outcomes if o.error_type is not None]
    if failed:
        details = "\n".join(f"--- rank {o.rank}: {o.error_type}\n{o.traceback}" for o in failed)
        raise AssertionError(f"{len(failed)} rank(s) failed:\n{details}")
    return [o.value for o in outcomes]
