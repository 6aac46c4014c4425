"""The per-rank entry point: set up the runtime, run the configured task, tear down.

launch.run's elastic agent calls run_worker() with the resolved config; external launchers start this
module directly and it composes the config itself:
    torchrun --standalone --nproc_per_node=2 -m launch.worker task=check
    srun torchrun --nnodes=$SLURM_NNODES ... -m launch.worker launcher=multinode task=train
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from . import bench, check, rundir, train
from .config import ConfigError, compose
from .runtime import setup, teardown
from .validate import validate

# task.name -> the function that runs it on every rank.
TASKS = {"train": train.train, "check": check.check, "bench": bench.bench}


def run_worker(cfg: dict[str, Any], run_dir: str) -> None:
    """Elastic entry point (a picklable function): run the configured task on this rank."""
    try:
        job = _job(cfg, Path(run_dir))  # before setup() writes this rank's log into the directory
        ctx = setup(cfg, Path(run_dir))
        try:
            ctx.job = job
            TASKS[cfg["task"]["name"]](ctx)
        except Exception as e:
            record_error(e)
            raise
        finally:
            teardown()
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: the launcher reports it, in one line
        raise SystemExit(130) from None


def record_error(error: Exception) -> None:
    """Write this rank's error file (the one the agent reports) now, before teardown closes its connections.

    Closing them makes each peer still waiting on this rank fail too ("Connection closed by peer"), and the
    agent stops the remaining workers as soon as one has failed: without this, the rank that failed first
    could be stopped before torch's own wrapper writes its file, and only the peer's echo would be reported.
    Must be called while ``error`` is being handled (the file holds its traceback).
    """
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # set by the elastic agent (launch.run, torchrun)
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)


def _job(cfg: dict[str, Any], run_dir: Path) -> str:
    """This job's token: from launch.run, which claimed the run directory; else this job claims it here.

    Every rank of an external launcher's job claims with the same key (its elastic run id): the first
    creates the marker atomically, the others (and restarted workers) join it.
    """
    token = os.environ.get(rundir.JOB_ENV)
    if token:
        return token
    key = f"elastic:{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}"  # torchrun, srun, Kubeflow
    return rundir.claim(run_dir, key, resume=bool(cfg["task"].get("resume", False))).token


def main(argv: list[str] | None = None) -> None:
    """Entry for external launchers (torchrun, srun torchrun, Kubeflow): compose and check the config here."""
    overrides = sys.argv[1:] if argv is None else argv
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        sys.exit(
            "error: launch.worker expects a launcher's environment (RANK, WORLD_SIZE, ...); run it under "
            "torchrun, or start a local job with: python -m launch.run"
        )
    # Every rank composes on its own: a run directory from the clock could differ between ranks, so the
    # default follows the job id (a later launcher.run_dir= override still wins).
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "run")
    try:
        cfg = compose([f"launcher.run_dir='outputs/torchrun/{run_id}'", *overrides])
        validate(cfg, world_size=int(os.environ["WORLD_SIZE"]))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    run_worker(cfg, cfg["launcher"]["run_dir"])


if __name__ == "__main__":
    main()
