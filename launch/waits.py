"""Every wait of a multi-node job bounded by a key, and one line saying what a failed wait was waiting for.

torch's elastic agent waits on other nodes in places no timeout of ours reaches (its exit barrier: 300 s; a
store reply over a dead link: TCP's retransmission limit, about 15 minutes). `bounded_agent` bounds them
by the config's timeout_s; `explain`, `hint` and `init_failed` turn the errors into one line with the fix.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator

from .network import NetworkError, NodeNetwork


def rdzv_timeouts(timeout_s: float) -> dict[str, int]:
    """c10d rendezvous options: each store call (torch: 60 s) and the close at shutdown (30 s)."""
    bound = max(1, int(timeout_s))
    return {"read_timeout": bound, "close_timeout": bound}


def _socket_fds() -> set[int]:
    """This process's open socket descriptors (Linux /proc; empty elsewhere)."""
    found = set()
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    found.add(int(name))
    return found


def _drop_when_unacked(fds: set[int], timeout_s: float) -> None:
    """Let the kernel drop these TCP connections when sent data stays unacknowledged for `timeout_s`.

    torch's store client waits for some replies (compare_set, add) in a recv() without timeout: over a dead
    link that lasts until TCP gives up retransmitting. TCP_USER_TIMEOUT makes that recv fail after
    `timeout_s`, which torch raises as a lost store connection. Non-TCP descriptors refuse the option.
    """
    option = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux
    for fd in fds if option else ():
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as conn:  # a duplicate
            conn.setsockopt(socket.IPPROTO_TCP, option, int(timeout_s * 1000))


@contextlib.contextmanager
def bounded_agent(timeout_s: float) -> Iterator[None]:
    """Within this block the elastic agent's own waits on other nodes end within `timeout_s`.

    Its exit barrier (a node whose workers finished waits there for the others: 300 s if one died) and
    every reply from the rendezvous store (see _drop_when_unacked).
    """
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as c10d_backend
    from torch.distributed.launcher import api

    saved = api.LocalElasticAgent, c10d_backend.TCPStore

    def tcp_store(*args, **kwargs):
        before = _socket_fds()
        store = saved[1](*args, **kwargs)
        _drop_when_unacked(_socket_fds() - before, timeout_s)
        return store

    api.LocalElasticAgent = functools.partial(saved[0], exit_barrier_timeout=timeout_s)
    c10d_backend.TCPStore = tcp_store
    try:
        yield
    finally:
        api.LocalElasticAgent, c10d_backend.TCPStore = saved


@contextlib.contextmanager
def quiet_agent() -> Iterator[None]:
    """Import torch in here: the agent process then logs C++ errors only (TORCH_CPP_LOG_LEVEL=ERROR).

    Its C++ code is the stores' socket code, whose warnings (a peer's hostname not resolvable, a timed-out
    poll, a failed send with its stack frames) repeat what our one-line errors say. torch reads the level
    once, at import; the workers started later keep the default. A level set by the user wins.
    """
    ours = "TORCH_CPP_LOG_LEVEL" not in os.environ
    if ours:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    try:
        yield
    finally:
        if ours:
            os.environ.pop("TORCH_CPP_LOG_LEVEL", None)


def one_line(text: str) -> str:
    """A message without the C++ stack frames torch appends to errors raised in C++."""
    return " ".join(str(text).split("Exception raised from", 1)[0].split())


def _cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {one_line(str(error))}"


def explain(
    error: Exception, net: NodeNetwork | None, launcher: dict, timeout_s: float
) -> NetworkError | None:
    """One line for a rendezvous or store failure seen by the agent; None for anything else."""
    from torch.distributed import DistError
    from torch.distributed.elastic.rendezvous import (
        RendezvousClosedError,
        RendezvousError,
        RendezvousTimeoutError,
    )

    if not isinstance(error, (RendezvousError, DistError)):
        return None
    store = net.store if net else launcher["rdzv_endpoint"]
    here = f"this node {net.where}" if net else "this node"
    cause = _cause(error)
    if isinstance(error, RendezvousTimeoutError):
        return NetworkError(
            f"the rendezvous at {store} did not complete within launcher.join_timeout_s="
            f"{launcher['join_timeout_s']:g} s ({here} waited for {launcher['nnodes']} nodes of run "
            f"{launcher['run_id']!r}): start the same command, with the same launcher.rdzv_endpoint, "
            "launcher.run_id and launcher.nnodes, on every node"
        )
    if isinstance(error, RendezvousClosedError):
        return NetworkError(
            f"the rendezvous of run {launcher['run_id']!r} at {store} is closed: a job with this "
            "launcher.run_id already ended there; use a new launcher.run_id, on every node"
        )
    if net is not None and net.is_host and "EADDRINUSE" in cause:
        return NetworkError(
            f"{here} cannot host the rendezvous store on port {net.port}, which is in use ({cause}): "
            "pick another port in launcher.rdzv_endpoint, on every node"
        )
    if "timed out" in cause.lower():
        return NetworkError(
            f"no reply from the rendezvous store at {store} to {here} within timeout_s={timeout_s:g} s "
            f"({cause}): the network between this node and the head failed, or the head stopped; see the "
            "head's output"
        )
    return NetworkError(
        f"lost the rendezvous store at {store} from {here} ({cause}): the head's agent ended (its workers "
        "failed, or it was stopped) or the network between the nodes failed; see the head's output"
    )


def hint(message: str, timeout_s: float) -> str | None:
    """A next step for a worker's failure in a multi-node job, when its message is about a lost peer."""
    text = message.lower()
    if "process-group init" not in text and any(
        sign in text for sign in ("timed out", "connection reset", "connection closed", "broken pipe")
    ):
        return (
            f"hint: a collective waited up to timeout_s={timeout_s:g} s for a rank on another node: "
            "that node lost the network or its workers failed; see the other nodes' output"
        )
    return None


def init_failed(error: Exception, backend: str, rank: int, world_size: int, timeout_s: float) -> RuntimeError:
    """One line for a process group that could not be created: what was waited for, where, and the fix."""
    master = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    var = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    return RuntimeError(
        f"process-group init ({backend}) failed on rank {rank} of {world_size} within timeout_s="
        f"{timeout_s:g} s ({_cause(error)}): the workers meet at the store {master} (rank 0's node, at "
        f"the address it advertises: launcher.local_addr) and connect to each other over the interface "
        f"{var}={os.environ.get(var)}: every node must reach the others there (unset, launch.run sets it "
        "to the interface of each node's route to the head)"
    )
