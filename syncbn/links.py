"""Same-host links: SyncBN's small exchanges between ranks of one machine over Unix domain sockets.

gloo's TCP transport hands every message to a helper thread that spins while the calling thread holds
the connection's lock; with more busy threads than cores (a laptop, a CI box) that spin lasts until the
kernel's next tick, 4 ms. A link is a blocking socket per peer, written and read by the calling thread.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import socket
import struct
import sys
import weakref

import torch
import torch.distributed as dist

# Messages up to this size go by link: every rank writes all its messages before reading any, so each must
# fit in the socket's buffer (Linux's default is about 200 KiB) or two ranks could block writing each other.
LINK_MAX_BYTES = 64 * 1024
_HEADER = struct.Struct("<Q")  # the payload's size in bytes: a mispaired call shows as a clear error
_LINKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # group -> Links, or None: use gloo
# How many exchanges went by link in this process (syncbn.testing counts them with gloo's collectives).
exchanges = 0


class LinkError(RuntimeError):
    """A link failed: the peer closed it, timed out, or sent a message of another size."""


class Links:
    """This rank's sockets to the other ranks of one group: ``outgoing[r]`` it writes, ``incoming[r]`` it
    reads; each carries whole messages, so the two stay in step as long as the ranks call in step."""

    def __init__(self, outgoing: dict[int, socket.socket], incoming: dict[int, socket.socket]):
        self.outgoing, self.incoming = outgoing, incoming
        self.failed = ""  # why the links broke, once they have
        self._headers = {r: bytearray(_HEADER.size) for r in incoming}

    def exchange(self, tensor: torch.Tensor, inboxes: dict[int, torch.Tensor]) -> None:
        """Send contiguous CPU ``tensor`` to every peer in ``inboxes``; receive each one's into its inbox.

        A peer that sent a message of another size (a mispaired call) raises LinkError once every message
        is read, and the links stay in step. A peer that closed its link or timed out breaks them: this
        rank closes all its links, so that every peer still waiting on it fails at once, not at its timeout.
        """
        global exchanges
        if self.failed:
            raise LinkError(f"SyncBN's links on this group failed earlier ({self.failed})")
        exchanges += 1
        data = _bytes(tensor)
        header = _HEADER.pack(len(data))
        broken, mismatched = [], []
        for r in inboxes:  # every send before any receive: a failed peer must not keep the others waiting
            try:
                sent = self.outgoing[r].sendmsg([header, data])
                if sent < len(header) + len(data):  # a partial write: rare at these sizes, but legal
                    self.outgoing[r].sendall((header + data.tobytes())[sent:])
            except OSError as e:
                broken.append(f"sending to rank {r}: {e or type(e).__name__}")
        for r, inbox in inboxes.items():
            try:
                mismatch = self._receive(r, _bytes(inbox))
            except (OSError, LinkError) as e:
                broken.append(f"receiving from rank {r}: {e or type(e).__name__}")
                continue
            if mismatch:
                mismatched.append(mismatch)
        if broken:
            self.failed = "; ".join(broken)
            self.close()
            raise LinkError(self.failed)
        if mismatched:
            raise LinkError("; ".join(mismatched))

    def _receive(self, peer: int, expected: memoryview) -> str | None:
        """Read ``peer``'s next message into ``expected``; what is wrong with its size, if anything."""
        sock = self.incoming[peer]
        _read_exactly(sock, memoryview(self._headers[peer]), peer)
        (size,) = _HEADER.unpack(self._headers[peer])
        if size == len(expected):
            _read_exactly(sock, expected, peer)
            return None
        _read_exactly(sock, memoryview(bytearray(size)), peer)  # read it anyway: the link stays in step
        return f"rank {peer} sent {size} bytes where this call expects {len(expected)}"

    def close(self) -> None:
        for sock in (*self.outgoing.values(), *self.incoming.values()):
            sock.close()


def _bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, valid while it lives. Not ``tensor.numpy()``: that dispatches
    four ATen ops per call, a fifth of a small layer step's whole budget."""
    if tensor.nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())).cast("B")


def _read_exactly(sock: socket.socket, view: memoryview, peer: int | str) -> None:
    while view.nbytes:
        got = sock.recv_into(view)
        if got == 0:
            raise LinkError(f"rank {peer} closed its link (it exited or failed)")
        view = view[got:]


def links(group: dist.ProcessGroup, timeout_s: float) -> Links | None:
    """The links of ``group``, set up on first use (a collective: every rank of the group calls it at the
    same call); None when they cannot serve it (ranks on other machines or network namespaces, not
    Linux, ``SYNCBN_LINKS=0``): then every rank uses gloo. The same answer on every rank."""
    if group in _LINKS:
        return _LINKS[group]
    found = _LINKS[group] = _connect(group, timeout_s)
    if found is not None:
        weakref.finalize(group, found.close)
    return found


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("SYNCBN_LINKS", "1") not in ("", "0")


def _connect(group: dist.ProcessGroup, timeout_s: float) -> Links | None:
    me, size = group.rank(), group.size()
    # An abstract socket name (Linux): no file to clean up; visible only inside this network namespace,
    # so ranks in other namespaces or on other machines fail to connect and the group falls back to gloo.
    name = b"\0syncbn-" + secrets.token_hex(16).encode()
    listener, outgoing = None, {}
    if enabled():
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(name)
        listener.listen(size)
    names = torch.zeros(size, len(name), dtype=torch.uint8)
    names[me] = torch.frombuffer(bytearray(name), dtype=torch.uint8) if listener else 0
    dist.all_reduce(names, group=group)  # every rank's name; all zeros where disabled
    for r in range(size):
        if r != me and listener is not None and names[r].any():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout_s)
                # room for the two messages that may be unread at once (see LINK_MAX_BYTES)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * LINK_MAX_BYTES)
                sock.connect(bytes(names[r].tolist()))
                sock.sendall(_HEADER.pack(me))
                outgoing[r] = sock
            except OSError:
                sock.close()
                break
    # Every rank has tried to connect before any waits to accept: a failure anywhere means gloo for all.
    ok = torch.tensor([int(listener is not None and len(outgoing) == size - 1)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    incoming = {}
    if ok.item():
        listener.settimeout(timeout_s)
        for _ in range(size - 1):
            sock, _ = listener.accept()
            sock.settimeout(timeout_s)
            hello = memoryview(bytearray(_HEADER.size))  # the connecting rank's number
            _read_exactly(sock, hello, "a connecting")
            incoming[_HEADER.unpack(hello)[0]] = sock
    if listener is not None:
        listener.close()
    if not ok.item():
        for sock in outgoing.values():
            sock.close()
        return None
    return Links(outgoing, incoming)
