"""This node's elastic agent: torch's LaunchConfig from the launcher settings, then the workers it starts.

The agent (the machinery behind torchrun) joins the c10d rendezvous, spawns nproc_per_node workers running
launch.worker.run_worker with the resolved config, restarts the group up to max_restarts times, and reports
the failing rank's own exception (and the file holding its traceback) when it gives up; Ctrl-C stops every
worker and exits 130 with one line.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import parse_nnodes
from .loopback import is_loopback, loopback_only
from .worker import run_worker

if TYPE_CHECKING:
    from torch.distributed.launcher.api import LaunchConfig


def launch_config(launcher: dict[str, Any], run_dir: Path) -> LaunchConfig:
    """torch's LaunchConfig for this node, from the launcher's settings (conf/launcher/*.yaml)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig

    min_nodes, max_nodes = parse_nnodes(launcher["nnodes"])
    nproc = launcher["nproc_per_node"]
    rdzv_configs: dict[str, Any] = {
        "join_timeout": int(launcher["join_timeout_s"]),
        "last_call_timeout": int(launcher["last_call_timeout_s"]),
    }
    if launcher["is_host"] is not None:
        # c10d guesses whether this node hosts the rendezvous store from its hostname, which fails behind
        # NAT, in containers and in network namespaces; the launcher can say so explicitly.
        rdzv_configs["is_host"] = launcher["is_host"]
    return LaunchConfig(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=nproc,
        run_id=launcher["run_id"],
        rdzv_backend="c10d",
        rdzv_endpoint=launcher["rdzv_endpoint"],
        rdzv_configs=rdzv_configs,
        max_restarts=launcher["max_restarts"],
        monitor_interval=launcher["monitor_interval_s"],
        start_method="spawn",
        local_addr=launcher["local_addr"],  # the address other nodes reach this agent's workers at
        # Local rank 0 keeps the console (and its progress bar); the others write only to files.
        logs_specs=DefaultLogsSpecs(
            log_dir=str(run_dir / "elastic"), redirects={r: Std.ALL for r in range(1, nproc)}
        ),
    )


def start(cfg: dict[str, Any], run_dir: Path) -> None:
    """Run this node's share of the job; exit 1 with the failing ranks' errors if the job fails."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    launcher = cfg["launcher"]
    _, max_nodes = parse_nnodes(launcher["nnodes"])
    host = launcher["rdzv_endpoint"].rpartition(":")[0]
    if max_nodes > 1 and is_loopback(host):
        print(
            f"warning: launcher.rdzv_endpoint={launcher['rdzv_endpoint']} with {max_nodes} nodes only works "
            "when all agents run on this machine; on a cluster give the head node's address",
            file=sys.stderr,
        )
    # A one-node job on loopback keeps the agent's stores off the network (see launch/loopback.py).
    local = max_nodes == 1 and is_loopback(host) and is_loopback(launcher["local_addr"])
    try:
        with loopback_only() if local else contextlib.nullcontext(), _own_shutdown_notices():
            elastic_launch(launch_config(launcher, run_dir), run_worker)(cfg, str(run_dir))
    except ChildFailedError as e:
        _report_failure(e, run_dir)
        raise SystemExit(1) from None
    except (KeyboardInterrupt, SignalException) as e:  # the agent has stopped every worker by now
        sig = signal.Signals(getattr(e, "sigval", signal.SIGINT))
        print(f"interrupted by {sig.name}: all workers stopped; run directory {run_dir}", file=sys.stderr)
        raise SystemExit(128 + sig) from None  # the shell's convention: 130 for Ctrl-C


# The agent's own log lines about stopping workers on a signal; start() says it in one line instead.
_SHUTDOWN_NOTICES = ("Received %s death signal", "Closing process %s via signal")
_AGENT_LOGGERS = (
    "torch.distributed.elastic.agent.server.api",
    "torch.distributed.elastic.multiprocessing.api",
)


@contextlib.contextmanager
def _own_shutdown_notices() -> Iterator[None]:
    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_SHUTDOWN_NOTICES)

    loggers = [logging.getLogger(name) for name in _AGENT_LOGGERS]
    for log in loggers:
        log.addFilter(keep)
    try:
        yield
    finally:
        for log in loggers:
            log.removeFilter(keep)


def _report_failure(error, run_dir: Path) -> None:
    """Print each failing rank's own exception and the file holding its traceback, not just 'child failed'."""
    failures = getattr(error, "failures", {}) or {}
    print(f"error: {len(failures) or 'some'} worker(s) failed; run directory {run_dir}", file=sys.stderr)
    for rank, failure in sorted(failures.items())[:4]:
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", message)
        print(f"  rank {rank} (exit code {failure.exitcode}): {message}", file=sys.stderr)
        if failure.error_file and Path(failure.error_file).is_file():
            print(f"    traceback: {failure.error_file}", file=sys.stderr)
        else:  # killed by a signal: no exception was recorded; its log says how far it got
            print(f"    log: {run_dir / 'logs' / f'rank{rank}.log'}", file=sys.stderr)
