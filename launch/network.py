"""Where this node sits on the network, worked out from its route to the rendezvous endpoint.

One command serves every node of a multi-node job: a node hosts the c10d store if the endpoint's address is
one of its own, its peers reach it at the source address of that route, and gloo and NCCL use the interface
holding that address. Also the bounded wait for the head's store, and each node's folder in the run dir.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915  # Linux ioctl: the IPv4 address of an interface


class NetworkError(RuntimeError):
    """A network problem a user can fix; the launcher prints it as one line, never as a traceback."""


@dataclass(frozen=True)
class NodeNetwork:
    """This node's part in the job's network; `is_host` None leaves the choice to torch (loopback)."""

    host: str  # the rendezvous host as the user wrote it
    addr: str  # ... and the address it resolves to here
    port: int
    is_host: bool | None
    local_addr: str
    ifname: str | None

    @property
    def store(self) -> str:
        return f"[{self.addr}]:{self.port}" if ":" in self.addr else f"{self.addr}:{self.port}"

    @property
    def where(self) -> str:
        """This node, as the messages name it."""
        return f"{self.local_addr} (interface {self.ifname or 'unknown'})"


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' as (host, port)."""
    host, _, port = str(endpoint).rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise NetworkError(f"launcher.rdzv_endpoint must be host:port, got {endpoint!r}") from None


def resolve(host: str, port: int) -> str:
    """The address `host` resolves to on this node (IPv4 first, as torch's store connects)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise NetworkError(
            f"cannot resolve the rendezvous host {host!r} on this node ({e.strerror}): give the head's IP "
            "address in launcher.rdzv_endpoint, or a name that every node resolves to it"
        ) from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


def route_source(addr: str, port: int) -> str:
    """The local address this node's packets to addr:port leave from (the peers reach us there)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((addr, port))  # UDP connect sends nothing: the kernel only picks route and source
            return str(probe.getsockname()[0])
    except OSError as e:
        raise NetworkError(
            f"no route from this node to the rendezvous host {addr} ({e.strerror}): check "
            "launcher.rdzv_endpoint and this node's network configuration"
        ) from None


def interfaces() -> dict[str, str]:
    """This machine's addresses and the interface holding each (IPv4 primary addresses and IPv6)."""
    import fcntl  # POSIX only; elastic launching needs Linux or macOS anyway

    found: dict[str, str] = {}
    for _, name in socket.if_nameindex():
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            found[socket.inet_ntoa(packed[20:24])] = name
    with contextlib.suppress(OSError), open("/proc/net/if_inet6") as table:
        for line in table:
            fields = line.split()
            found[str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))] = fields[-1]
    return found


def interface_of(addr: str) -> str | None:
    try:
        key = str(ipaddress.ip_address(addr.split("%")[0]))
    except ValueError:  # a hostname given as launcher.local_addr
        return None
    return interfaces().get(key)


def _is_name(host: str) -> bool:
    """A host name other than localhost (not an address literal)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host != "localhost"
    return False


def default_source() -> str | None:
    """The source address of this node's default route, or None without one (no packet is sent)."""
    try:
        return route_source("198.51.100.1", 9)  # TEST-NET-2: routed nowhere, so the default route applies
    except NetworkError:
        return None


def plan(endpoint: str, is_host: bool | None = None, local_addr: str | None = None) -> NodeNetwork:
    """Work out this node's role and addresses; `is_host`/`local_addr` given by the user win."""
    host, port = split_endpoint(endpoint)
    addr = resolve(host, port)
    if ipaddress.ip_address(addr).is_loopback:
        # All agents on this machine (torch's own guess, host the store or else join it, is right), or a
        # host name that /etc/hosts maps to loopback here only (Debian's 127.0.1.1): then the other nodes
        # resolve it to this node's real address and reach it at the source of its default route.
        local = local_addr or (default_source() if _is_name(host) else None) or addr
        return NodeNetwork(host, addr, port, is_host, local, interface_of(local))
    source = route_source(addr, port)
    # The kernel routes our own addresses through loopback and keeps them as the source address.
    mine = ipaddress.ip_address(source) == ipaddress.ip_address(addr)
    local = local_addr or source
    return NodeNetwork(host, addr, port, mine if is_host is None else is_host, local, interface_of(local))


def use_interface(net: NodeNetwork) -> dict[str, str]:
    """Point gloo and NCCL at this node's interface, in the environment the workers inherit.

    Left alone where the user set them. Without this they bind to what the hostname resolves to, often
    127.0.0.1, and the peers can never connect.
    """
    chosen = {}
    if net.ifname:
        for name in IFNAME_VARS:
            if not os.environ.get(name):
                os.environ[name] = chosen[name] = net.ifname
    return chosen


def wait_for_store(net: NodeNetwork, timeout_s: float) -> float:
    """Wait until the head's rendezvous store accepts connections; seconds waited, or NetworkError.

    The head may start after the other nodes, so refused connections are retried until `timeout_s`.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    while True:
        attempt = max(0.1, min(5.0, deadline - time.monotonic()))
        try:
            with socket.create_connection((net.addr, net.port), timeout=attempt):
                return time.monotonic() - start
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            raise NetworkError(
                f"cannot reach the rendezvous store at {net.store} from this node {net.where} within "
                f"launcher.connect_timeout_s={timeout_s:g} s ({reason}): start the same command on the head "
                f"(the node that owns {net.addr}), and check that address and that TCP port {net.port} is "
                "open between the nodes"
            )
        time.sleep(min(0.5, left))


def describe(net: NodeNetwork, chosen: dict[str, str]) -> str:
    """One line for the agent's log: what this node worked out, and which interface settings are whose."""
    role = "hosts" if net.is_host else "joins" if net.is_host is False else "hosts or joins (torch decides)"
    settings = []
    for name in IFNAME_VARS:
        value = os.environ.get(name)
        if not value:
            settings.append(f"{name} unset: no interface holds {net.local_addr}, set it")
        else:
            settings.append(f"{name}={value}" + ("" if name in chosen else " (yours)"))
    return (
        f"rendezvous {net.host}:{net.port} ({net.store}): this node {role} the store; this node's address "
        f"{net.local_addr} (interface {net.ifname or 'unknown'}); {', '.join(settings)}"
    )


def _check_given(net: NodeNetwork, chosen: dict[str, str]) -> None:
    """Warn when an interface the user named is not the one this node reaches the head over."""
    for name in IFNAME_VARS:
        value = os.environ.get(name, "")
        if net.ifname and value and name not in chosen and net.ifname not in value:
            log.warning(
                "%s=%s, but this node reaches the rendezvous host %s from %s on interface %s: if the other "
                "nodes cannot reach %s, the process group will time out; unset it to use %s",
                name, value, net.addr, net.local_addr, net.ifname, value, net.ifname,
            )  # fmt: skip


def prepare(launcher: dict) -> NodeNetwork:
    """Everything a multi-node agent does before torch's rendezvous: plan, pick interfaces, reach the head."""
    net = plan(launcher["rdzv_endpoint"], launcher.get("is_host"), launcher.get("local_addr"))
    chosen = use_interface(net)
    log.info(describe(net, chosen))
    _check_given(net, chosen)
    if net.local_addr != net.addr and ipaddress.ip_address(net.addr).is_loopback:
        log.warning(
            "%s resolves to %s on this node only, it seems (its own name in /etc/hosts): the other nodes "
            "must reach it at %s; if they cannot, give the head's IP address in launcher.rdzv_endpoint",
            net.host, net.addr, net.local_addr,
        )  # fmt: skip
    if net.is_host is False:
        waited = wait_for_store(net, float(launcher["connect_timeout_s"]))
        log.info("reached the rendezvous store at %s after %.1f s", net.store, waited)
    return net


def node_name() -> str:
    """This agent's folder in a shared run directory: host name and process id, unique on a shared disk."""
    return f"{socket.gethostname()}-{os.getpid()}"


def register_resolvers() -> None:
    """${syncbn.node:} in the config (conf/launcher/multinode.yaml keys each node's own files by it)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("syncbn.node", node_name, replace=True)
