"""This node's elastic agent: torch's LaunchConfig from the launcher settings, then the workers it starts.

The agent (the machinery behind torchrun) joins the c10d rendezvous, spawns nproc_per_node workers running
launch.worker.run_worker with the resolved config, restarts the group up to max_restarts times, and when it
gives up reports each failed rank's own exception and traceback file, the first failure first. A node of a
multi-node job first works out its place on the network (launch/network.py), and every wait of its agent is
bounded by timeout_s (launch/waits.py). Ctrl-C stops every worker and exits 130 with one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import network, waits
from .config import parse_nnodes
from .loopback import is_loopback, loopback_only
from .network import NetworkError, NodeNetwork
from .worker import run_worker

if TYPE_CHECKING:
    from torch.distributed.launcher.api import LaunchConfig


def launch_config(
    launcher: dict[str, Any], run_dir: Path, net: NodeNetwork | None = None, timeout_s: float | None = None
) -> LaunchConfig:
    """torch's LaunchConfig for this node, from the launcher's settings (conf/launcher/*.yaml).

    ``net`` (a node of a multi-node job) supplies is_host and local_addr, and ``timeout_s`` then bounds
    each rendezvous store call; without them the launcher's own keys are used as they are.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.launcher.api import LaunchConfig

    min_nodes, max_nodes = parse_nnodes(launcher["nnodes"])
    nproc = launcher["nproc_per_node"]
    rdzv_configs: dict[str, Any] = {
        "join_timeout": int(launcher["join_timeout_s"]),
        "last_call_timeout": int(launcher["last_call_timeout_s"]),
    }
    # c10d guesses whether this node hosts the rendezvous store from its hostname, which fails behind
    # NAT, in containers and in network namespaces; multi-node agents work it out from their addresses.
    is_host = net.is_host if net else launcher["is_host"]
    if is_host is not None:
        rdzv_configs["is_host"] = is_host
    if net is not None and timeout_s is not None:
        rdzv_configs |= waits.rdzv_timeouts(timeout_s)
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
        # The address other nodes reach this agent's workers at (rank 0's becomes the workers' MASTER_ADDR).
        local_addr=net.local_addr if net else launcher["local_addr"],
        # Local rank 0 keeps the console (and its progress bar); the others write only to files.
        logs_specs=DefaultLogsSpecs(
            log_dir=str(run_dir / "elastic"), redirects={r: Std.ALL for r in range(1, nproc)}
        ),
    )


def start(cfg: dict[str, Any], run_dir: Path) -> None:
    """Run this node's share of the job; exit 1 with one line (or the failing ranks' errors) if it fails."""
    from torch.distributed.elastic.multiprocessing import SignalException

    launcher = cfg["launcher"]
    _, max_nodes = parse_nnodes(launcher["nnodes"])
    host = launcher["rdzv_endpoint"].rpartition(":")[0].strip("[]")  # "[::1]:0" is loopback too
    if max_nodes > 1 and is_loopback(host):
        print(
            f"warning: launcher.rdzv_endpoint={launcher['rdzv_endpoint']} with {max_nodes} nodes only works "
            "when all agents run on this machine; on a cluster give the head node's address",
            file=sys.stderr,
        )
    # A one-node job on loopback keeps the agent's stores off the network (see launch/loopback.py).
    local = max_nodes == 1 and is_loopback(host) and is_loopback(launcher["local_addr"])
    try:
        net = None if local else network.prepare(launcher)
        with loopback_only() if local else waits.bounded_agent(cfg["timeout_s"]), _own_shutdown_notices():
            _elastic_launch(cfg, run_dir, net)
    except NetworkError as e:  # a network problem the user can fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
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


def _elastic_launch(cfg: dict[str, Any], run_dir: Path, net: NodeNetwork | None) -> None:
    """torch's elastic_launch; worker failures and rendezvous/store failures end in one line each."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    launcher, timeout_s = cfg["launcher"], cfg["timeout_s"]
    try:
        elastic_launch(launch_config(launcher, run_dir, net, timeout_s), run_worker)(cfg, str(run_dir))
    except ChildFailedError as e:
        _report_failure(e, run_dir, timeout_s if net else None)
        raise SystemExit(1) from None
    except Exception as e:  # rendezvous and store failures: one line naming the wait, not a C++ traceback
        explained = waits.explain(e, net, launcher, timeout_s)
        if explained is None:
            raise
        raise explained from None


def _report_failure(error, run_dir: Path, timeout_s: float | None = None) -> None:
    """Print every failed rank's own exception, the first to fail first (with a hint when multi-node).

    The agent names only the worker it saw exit first and stops the others; but once one rank fails, its
    peers fail too ("Connection closed by peer"), and the one seen first may be such an echo. Each worker
    writes its error file before closing its connections (worker.record_error), so the files of this
    attempt, oldest first, lead with the cause.
    """
    failures = _attempt_failures(getattr(error, "failures", {}) or {})
    first = f"; rank {failures[0].rank} failed first" if len(failures) > 1 else ""
    print(
        f"error: {len(failures) or 'some'} worker(s) failed; run directory {run_dir}{first}", file=sys.stderr
    )
    hints = set()
    for failure in failures[:4]:
        how = f"exit code {failure.exitcode}" if failure.exitcode is not None else "error recorded"
        print(f"  rank {failure.rank} ({how}): {waits.one_line(failure.message)}", file=sys.stderr)
        if failure.error_file is not None:
            print(f"    traceback: {failure.error_file}", file=sys.stderr)
        else:  # killed by a signal: no exception was recorded; its log says how far it got
            print(f"    log: {run_dir / 'logs' / f'rank{failure.rank}.log'}", file=sys.stderr)
        if timeout_s is not None:
            hints.add(waits.hint(failure.message, timeout_s))
    for line in sorted(h for h in hints if h):
        print(line, file=sys.stderr)


@dataclass
class _Failure:
    rank: int
    exitcode: int | None  # None: not reported by the agent (stopped after it had recorded its error)
    message: str
    error_file: Path | None  # None: it recorded no error (killed by a signal)
    recorded_at: float  # the error file's mtime; inf without one


def _attempt_failures(reported: dict[int, Any]) -> list[_Failure]:
    """The agent's failures plus every other worker of the same attempt that recorded an error, in the
    order they recorded them. Error files live at <attempt dir>/<local rank>/error.json."""
    found: dict[int, _Failure] = {}
    attempts: dict[Path, int] = {}  # attempt dir -> global rank of its local rank 0
    for rank, failure in reported.items():
        path = Path(failure.error_file) if failure.error_file else None
        found[rank] = _failure(rank, failure.exitcode, _text(failure.message), path)
        if path is not None:
            attempts[path.parent.parent] = rank - failure.local_rank
    for attempt, base in attempts.items():
        for path in attempt.glob("*/error.json"):
            rank = base + int(path.parent.name) if path.parent.name.isdigit() else None
            if rank is None or rank in found:
                continue
            # a file cut off as its worker was stopped is left out
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                found[rank] = _failure(rank, None, _text(json.loads(path.read_text())["message"]), path)
    return sorted(found.values(), key=lambda f: (f.recorded_at, f.rank))


def _text(message: Any) -> str:
    """An error file's message: torch nests the text in a dict with the traceback beside it."""
    return str(message.get("message", message) if isinstance(message, dict) else message)


def _failure(rank: int, exitcode: int | None, message: str, path: Path | None) -> _Failure:
    try:
        return _Failure(rank, exitcode, message, path, path.stat().st_mtime if path else math.inf)
    except OSError:
        return _Failure(rank, exitcode, message, None, math.inf)
