"""Keep a single-machine job's rendezvous on loopback: the elastic agent's stores listen on 127.0.0.1 only.

torch's TCPStore server listens on every interface, whatever host it is given. For local runs the agent
pre-binds each store's socket to 127.0.0.1 and hands it over (``master_listen_fd``). Gloo's own sockets
follow the address the hostname resolves to (GLOO_SOCKET_IFNAME overrides). Multi-node runs are left alone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bound_fd(port: int) -> tuple[int, int]:
    """A listening IPv4 socket on 127.0.0.1:port (0 = any free port), as (fd, port); the store owns the fd."""
    sock = socket.create_server(("127.0.0.1", port), backlog=4096)
    port = sock.getsockname()[1]
    return sock.detach(), port


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Within this block, TCPStore servers created by the elastic agent listen on 127.0.0.1 only."""
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend as c10d_backend
    from torch.distributed.elastic.rendezvous import dynamic_rendezvous

    base = dist.TCPStore

    def tcp_store(host_name, port, *args, is_master=False, **kwargs):
        if is_master and kwargs.get("master_listen_fd") is None:
            kwargs["master_listen_fd"], port = _bound_fd(port)
        return base(host_name, port, *args, is_master=is_master, **kwargs)

    def create_server(self, master_addr, master_port):
        return tcp_store(master_addr, master_port, is_master=True, multi_tenant=True)

    handler = dynamic_rendezvous.DynamicRendezvousHandler
    saved = (c10d_backend.TCPStore, handler._create_tcp_store_server)
    c10d_backend.TCPStore = tcp_store  # the rendezvous store
    handler._create_tcp_store_server = create_server  # the store the workers share
    try:
        yield
    finally:
        c10d_backend.TCPStore, handler._create_tcp_store_server = saved
