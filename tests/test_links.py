"""syncbn.links: ranks of one machine exchange SyncBN's payloads over their own sockets, with the same bits as
gloo; larger payloads, ranks that cannot reach each other's sockets and SYNCBN_LINKS=0 fall back to gloo
on every rank together; a rank that leaves makes the others fail at once, not at the timeout."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from syncbn import comms, links
from syncbn.comms import private_group

from .dist import spawn, values

pytestmark = pytest.mark.multiprocess


def _gloo_messages(fn) -> int:
    """How many gloo point-to-point calls ``fn`` makes on this rank."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name in ("gloo:send", "gloo:recv") for e in prof.events())


def on_one_host(rank: int, world_size: int) -> dict:
    comms.EXCHANGE_MAX_RANKS = 8  # the default, whatever the environment says
    group = private_group()
    out = {}
    x = torch.arange(5, dtype=torch.float64) * 10.0 ** (rank * 3)
    out["small_gloo"] = _gloo_messages(lambda: comms.all_reduce_sum(x))
    out["small"] = x.tolist()
    out["linked"] = links.links(group, 5.0) is not None
    # Past LINK_MAX_BYTES gloo carries the message: the decision depends on the size, the same on all ranks.
    big = torch.full((links.LINK_MAX_BYTES // 8 + 1,), float(rank + 1), dtype=torch.float64)
    out["big_gloo"] = _gloo_messages(lambda: comms.all_reduce_sum(big))
    out["big"] = big.unique().tolist()
    # The last rank leaves (closes its links, as a process that exits does): the others fail at once.
    if rank == world_size - 1:
        links.links(group, 5.0).close()
        return out
    start = time.monotonic()
    try:
        comms.all_reduce_sum(torch.ones(3))
    except RuntimeError as e:
        out["left"] = (str(e), time.monotonic() - start)
    try:  # and stay failed, saying why, instead of mispairing the next call
        comms.all_reduce_sum(torch.ones(3))
    except RuntimeError as e:
        out["after"] = str(e)
    return out


def test_ranks_on_one_host_exchange_over_links(tmp_path):
    per_rank = values(spawn(on_one_host, 3, tmp_path, timeout=60))
    expected = [float(sum(i * 10.0 ** (r * 3) for r in range(3))) for i in range(5)]
    for rank, r in enumerate(per_rank):
        assert r["linked"] and r["small_gloo"] == 0, r
        assert r["small"] == expected
        assert r["big_gloo"] == 4 and r["big"] == [6.0]  # 2 sends and 2 receives each
        if rank < 2:
            message, seconds = r["left"]
            assert "rank 2 closed its link" in message and "Likely cause" in message, message
            assert seconds < 2.0, seconds  # the group's timeout is 60 s
            assert "failed earlier" in r["after"] and "rank 2 closed its link" in r["after"], r["after"]


def one_rank_without_links(rank: int, world_size: int) -> dict:
    if rank == 1:
        os.environ["SYNCBN_LINKS"] = "0"  # as a rank in another network namespace: it cannot take part
    x = torch.full((4,), float(rank + 1), dtype=torch.float64)
    gloo = _gloo_messages(lambda: comms.all_reduce_sum(x))
    return {"linked": links.links(private_group(), 5.0) is not None, "gloo": gloo, "sum": x.tolist()}


def test_a_rank_that_cannot_link_sends_every_rank_to_gloo(tmp_path):
    for r in values(spawn(one_rank_without_links, 2, tmp_path, timeout=60)):
        assert not r["linked"] and r["gloo"] == 2 and r["sum"] == [3.0] * 4, r


def test_link_bytes_are_the_tensor_bytes_without_dispatch():
    from syncbn.testing import aten_ops

    t = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    assert bytes(links._bytes(t)) == t.numpy().tobytes()
    assert bytes(links._bytes(torch.empty(0))) == b""
    assert aten_ops(lambda: links._bytes(t)) == []


def test_a_world_of_one_links_to_nobody(tmp_path):
    """A world of one has no peers: links are set up empty and used without a message."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        found = links.links(dist.group.WORLD, 5.0)
        assert found is not None and found.outgoing == {} and found.incoming == {}
    finally:
        dist.destroy_process_group()
