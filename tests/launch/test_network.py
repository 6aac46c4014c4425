"""What a node works out about its network (launch/network.py), the bounds on its waits (launch/waits.py),
and, end to end on loopback, a multi-node job's shared run directory and its rendezvous timeout.

The two-host versions (hostnames resolving to 127.0.0.1, a link going down) are in test_netns.py (root).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml

from launch import network, waits
from launch.network import NetworkError, NodeNetwork

from .jobs import ROOT, clean_env, free_port

linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc (Linux)")


def _own_address() -> tuple[str, str] | None:
    """A non-loopback IPv4 address of this machine and its interface, if it has one."""
    for addr, ifname in network.interfaces().items():
        ip = ipaddress.ip_address(addr)
        if ip.version == 4 and not ip.is_loopback:
            return addr, ifname
    return None


def test_split_endpoint():
    assert network.split_endpoint("head:29400") == ("head", 29400)
    assert network.split_endpoint("[fd00::1]:29400") == ("fd00::1", 29400)
    with pytest.raises(NetworkError, match="must be host:port, got 'head'"):
        network.split_endpoint("head")


def test_unresolvable_host_is_one_clear_error():
    with pytest.raises(NetworkError, match=r"cannot resolve the rendezvous host 'no-such-host\.invalid'"):
        network.plan("no-such-host.invalid:29400")


@linux_only
def test_loopback_endpoint_leaves_the_host_choice_to_torch():
    net = network.plan("127.0.0.1:29400")
    assert net.is_host is None and net.local_addr == "127.0.0.1" and net.ifname == "lo"
    assert network.interface_of("127.0.0.1") == "lo" and network.interface_of("not-an-ip") is None


@linux_only
def test_own_address_means_this_node_hosts_and_peers_reach_it_there():
    own = _own_address()
    if own is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    addr, ifname = own
    net = network.plan(f"{addr}:29400")
    assert (net.is_host, net.local_addr, net.ifname) == (True, addr, ifname)
    # The user's keys win over what the node works out.
    net = network.plan(f"{addr}:29400", is_host=False, local_addr="127.0.0.1")
    assert (net.is_host, net.local_addr, net.ifname) == (False, "127.0.0.1", "lo")


@linux_only
def test_own_name_resolving_to_loopback_advertises_the_default_route_address(monkeypatch):
    """Debian maps a host's own name to 127.0.1.1: its peers still reach it at its real address."""
    source = network.default_source()
    if source is None:
        pytest.skip("no default route on this machine")
    monkeypatch.setattr(network, "resolve", lambda host, port: "127.0.1.1")
    net = network.plan("head-node:29400")
    assert (net.is_host, net.local_addr, net.ifname) == (None, source, network.interface_of(source))
    assert network.plan("localhost:29400").local_addr == "127.0.1.1"  # all agents on this machine


def test_interface_variables_set_by_the_user_are_kept(monkeypatch):
    net = NodeNetwork("head", "10.0.0.1", 29400, False, "10.0.0.2", "eth7")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    assert network.use_interface(net) == {"NCCL_SOCKET_IFNAME": "eth7"}
    assert os.environ["GLOO_SOCKET_IFNAME"] == "ib0" and os.environ["NCCL_SOCKET_IFNAME"] == "eth7"
    line = network.describe(net, {"NCCL_SOCKET_IFNAME": "eth7"})
    assert "this node joins the store" in line and "GLOO_SOCKET_IFNAME=ib0 (yours)" in line


def test_store_wait_returns_once_the_head_listens_and_is_bounded_otherwise():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        net = NodeNetwork("127.0.0.1", "127.0.0.1", port, False, "127.0.0.1", "lo")
        assert network.wait_for_store(net, 5) < 1
    start = time.monotonic()
    with pytest.raises(NetworkError) as error:
        network.wait_for_store(net, 1.5)  # nobody listens there any more
    assert 1.5 <= time.monotonic() - start < 3
    assert str(error.value).startswith(
        f"cannot reach the rendezvous store at 127.0.0.1:{port} from this node 127.0.0.1 (interface lo) "
        "within launcher.connect_timeout_s=1.5 s (Connection refused)"
    )


@linux_only
def test_store_connections_drop_when_unacknowledged():
    with socket.create_server(("127.0.0.1", 0)) as server:
        before = waits._socket_fds()
        client = socket.create_connection(server.getsockname())
        new = waits._socket_fds() - before
        assert client.fileno() in new
        waits._drop_when_unacked(new, 7.5)
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7500
        client.close()


def test_messages_are_one_line_without_cpp_frames():
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousConnectionError

    text = "Connection timed out\nException raised from recvBytes at Utils.hpp:784\nframe #0: c10::Error"
    assert waits.one_line(text) == "Connection timed out"
    launcher = {"rdzv_endpoint": "h:1", "join_timeout_s": 5.0, "nnodes": "2", "run_id": "x"}
    net = NodeNetwork("h", "10.0.0.1", 1, False, "10.0.0.2", "eth0")
    try:
        try:
            raise DistNetworkError(text)
        except DistNetworkError as inner:
            raise RendezvousConnectionError("The connection to the C10d store has failed.") from inner
    except RendezvousConnectionError as e:
        explained = waits.explain(e, net, launcher, 9.0)
    assert str(explained) == (
        "no reply from the rendezvous store at 10.0.0.1:1 to this node 10.0.0.2 (interface eth0) within "
        "timeout_s=9 s (DistNetworkError: Connection timed out): the network between this node and the "
        "head failed, or the head stopped; see the head's output"
    )
    assert waits.explain(ValueError("not ours"), net, launcher, 9.0) is None
    closed = waits.explain(RendezvousClosedError(), net, launcher, 9.0)
    assert str(closed).startswith("the rendezvous of run 'x' at 10.0.0.1:1 is closed")
    assert waits.hint("Timed out waiting 9000ms for recv operation", 9.0).startswith(
        "hint: a collective waited up to timeout_s=9 s"
    )
    assert waits.hint("ValueError: expected C=3 channels", 9.0) is None


def _multinode(run_id: str, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launch.run",
        "launcher=multinode",
        "launcher.nnodes=2",
        "launcher.nproc_per_node=1",
        f"launcher.rdzv_endpoint=127.0.0.1:{port}",
        f"launcher.run_id={run_id}",
        *extra,
    ]


def test_two_agents_share_one_run_directory_without_sharing_files(tmp_path):
    """Same command, same working directory: the job's files once, each agent's own files apart."""
    command = _multinode("shared", free_port(), "task=check")
    procs = [
        subprocess.Popen(command, cwd=tmp_path, env=clean_env(), stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    run_dir = tmp_path / "outputs" / "shared"
    assert json.loads((run_dir / "check.json").read_text())["world_size"] == 2
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["launcher"]["run_id"] == "shared"
    assert not (run_dir / ".hydra").exists() and not (run_dir / "run.log").exists()
    nodes = sorted((run_dir / "nodes").iterdir())
    assert [n.name for n in nodes] == sorted(f"{socket.gethostname()}-{p.pid}" for p in procs)
    for node in nodes:
        assert sorted(p.name for p in (node / ".hydra").iterdir()) == [
            "config.yaml",
            "hydra.yaml",
            "overrides.yaml",
        ]
        assert yaml.safe_load((node / ".hydra" / "overrides.yaml").read_text()) == command[3:]
        assert "this node hosts or joins (torch decides) the store" in (node / "run.log").read_text()


def test_rendezvous_that_never_completes_fails_after_join_timeout(tmp_path):
    start = time.monotonic()
    proc = subprocess.run(
        _multinode("alone", free_port(), "task=check", "launcher.join_timeout_s=3"),
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 1 and 3 <= seconds < 3 + 15, (seconds, proc.stderr[-3000:])
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("error: the rendezvous at 127.0.0.1:")
        and "did not complete within launcher.join_timeout_s=3 s" in proc.stderr
    )
    assert "Traceback" not in proc.stderr and str(ROOT) not in proc.stderr


def test_process_group_init_failure_is_one_line_naming_store_and_interface(tmp_path):
    env = clean_env() | {"GLOO_SOCKET_IFNAME": "nosuchif0"}  # a user override naming no interface here
    proc = subprocess.run(
        [sys.executable, "-m", "launch.run", "task=check", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    # Both ranks fail; the agent reports the one it saw first, rank 0 or rank 1.
    line = next(x for x in proc.stderr.splitlines() if re.match(r"  rank \d \(exit code 1\): ", x))
    rank = line.split()[1]
    assert f"RuntimeError: process-group init (gloo) failed on rank {rank} of 2" in line
    assert "the workers meet at the store 127.0.0.1:" in line and "GLOO_SOCKET_IFNAME=nosuchif0" in line
    assert "Exception raised from" not in proc.stderr
