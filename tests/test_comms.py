"""syncbn.comms: safe without torch.distributed, the timeout it is given reaches SyncBN's private group,
the group is cached on the layer (and renewed with a new world), debug mode from the environment."""

from __future__ import annotations

import copy
import datetime
import os
import subprocess
import sys
import time
import weakref

import pytest
import torch
import torch.distributed as dist

from syncbn import SyncBatchNorm, comms

from .dist import spawn, values


@pytest.fixture
def restore_comms():
    saved = comms.timeout(), comms.debug()
    yield
    comms.set_timeout(saved[0])
    comms.set_debug(saved[1])


def test_not_initialized_is_a_world_of_one():
    assert not comms.is_initialized()
    assert comms.world_size() == 1 and comms.rank() == 0 and comms.world_token() is None


def test_world_token_changes_with_a_new_world(tmp_path):
    tokens = []
    for i in range(2):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / f'init{i}'}", rank=0, world_size=1)
        tokens.append(comms.world_token())
        assert tokens[-1] is comms.world_token()
        dist.destroy_process_group()
    assert tokens[0] is not None and tokens[0] is not tokens[1]


def test_timeout_defaults_to_torch_and_takes_seconds_or_timedelta(restore_comms):
    comms.set_timeout(None)
    assert comms.timeout() == dist.default_pg_timeout
    comms.set_timeout(7.5)
    assert comms.timeout() == datetime.timedelta(seconds=7.5)
    comms.set_timeout(datetime.timedelta(minutes=2))
    assert comms.timeout() == datetime.timedelta(minutes=2)
    for bad in (0, -1.0, datetime.timedelta(0)):
        with pytest.raises(ValueError, match="must be positive"):
            comms.set_timeout(bad)
    assert comms.timeout() == datetime.timedelta(minutes=2)  # a rejected value changes nothing


def test_debug_mode_from_the_environment():
    code = "from syncbn import comms; print(comms.debug())"
    for value, expected in (("1", "True"), ("0", "False"), ("", "False")):
        env = {**os.environ, "SYNCBN_DEBUG": value}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.stdout.strip() == expected, (value, out.stderr[-2000:])


def private_group_timeout(rank: int, world_size: int) -> dict:
    """The world group waits 30 s (the harness's pg_timeout); SyncBN's group was given 2 s by set_timeout."""
    layer = SyncBatchNorm(3)
    layer(torch.randn(4, 3))  # both ranks: the private group exists now
    result = {"private_is_separate": layer._sync_state.group is not dist.group.WORLD}
    if rank == 0:  # rank 1 stops syncing: rank 0's next all-reduce must fail after SyncBN's 2 s
        start = time.monotonic()
        try:
            layer(torch.randn(4, 3))
        except RuntimeError as e:
            result["error"] = str(e)
        result["seconds"] = time.monotonic() - start
    dist.barrier()  # the world group is untouched by the failed private all-reduce
    return result


def test_the_given_timeout_reaches_the_private_group(tmp_path):
    # tests/dist.py calls comms.set_timeout(pg_timeout) like the launcher; this worker lowers it first
    first, second = values(spawn(_with_timeout, 2, tmp_path, 2.0, timeout=90, pg_timeout=30))
    assert first["private_is_separate"] and second["private_is_separate"]
    assert "Likely cause" in first["error"] and "all-reduce" in first["error"], first
    assert 1.5 < first["seconds"] < 15, first  # 2 s, not the world group's 30 s


def _with_timeout(rank: int, world_size: int, seconds: float) -> dict:
    comms.set_timeout(seconds)
    return private_group_timeout(rank, world_size)


def group_cache(rank: int, world_size: int) -> dict:
    """private_group is looked up on a layer's first synced call only, and again for a new process_group."""
    calls = []
    lookup = comms.private_group

    def counting(group):
        calls.append(group)
        return lookup(group)

    comms.private_group = counting
    try:
        layer = SyncBatchNorm(3)
        for _ in range(4):
            layer(torch.randn(4, 3)).sum().backward()
        first = len(calls)
        twin = copy.deepcopy(layer)  # an EMA copy: the cached process group is not carried (not copyable)
        layer.process_group = dist.new_group([0, 1])  # convert_sync_batchnorm(process_group=...) does this
        layer(torch.randn(4, 3))
        layer.eval()
        layer(torch.randn(4, 3))  # eval: no lookup, no collective
        return {"first": first, "after_new_group": len(calls), "copy_state": twin._sync_state}
    finally:
        comms.private_group = lookup


def test_the_group_is_cached_on_the_layer(tmp_path):
    for r in values(spawn(group_cache, 2, tmp_path)):
        assert r == {"first": 1, "after_new_group": 2, "copy_state": None}, r


def groups_after_destroy(rank: int, world_size: int, exchange_max_ranks: int) -> dict:
    """A layer still alive (the model in scope) when the job calls destroy_process_group()."""
    comms.EXCHANGE_MAX_RANKS = exchange_max_ranks
    layer = SyncBatchNorm(3)
    for _ in range(3):
        layer(torch.randn(4, 3, requires_grad=True)).sum().backward()
    world, private = weakref.ref(dist.group.WORLD), weakref.ref(layer._sync_state.group)
    assert private() is not world()
    dist.destroy_process_group()
    return {"world_freed": world() is None, "private_freed": private() is None}


@pytest.mark.parametrize("exchange_max_ranks", [1, 8])
def test_destroy_process_group_frees_the_groups_while_layers_live(exchange_max_ranks, tmp_path):
    """A gloo group that outlives destroy_process_group() keeps its threads until Python finalizes, where
    a thread still releasing its last collective aborts the process ("terminate called without an
    active exception", seen in torchrun task=check); SyncBN must not be what keeps the groups alive."""
    for r in values(spawn(groups_after_destroy, 2, tmp_path, exchange_max_ranks)):
        assert r == {"world_freed": True, "private_freed": True}, r


def errors_on_all_ranks(rank: int, world_size: int) -> dict:
    out = {"gathered": comms.gather_objects(f"r{rank}")}
    try:
        comms.raise_on_all_ranks("bad input" if rank == 1 else None)
    except ValueError as e:
        out["raised"] = str(e)
    try:
        comms.check_num_features(3 + rank, torch.device("cpu"))
    except ValueError as e:
        out["disagree"] = str(e)
    return out


def test_errors_are_raised_on_every_rank_with_every_rank_named(tmp_path):
    for r in values(spawn(errors_on_all_ranks, 3, tmp_path)):
        assert r["gathered"] == ["r0", "r1", "r2"]
        assert r["raised"] == "SyncBatchNorm failed on rank 1: bad input"
        assert "rank 0: C=3, rank 1: C=4, rank 2: C=5" in r["disagree"]


def sums(rank: int, world_size: int) -> dict:
    """all_reduce_sum on small gloo groups (a direct exchange) against the group's own allreduce, and the
    two-rank swap. Values with many digits, so the order of the additions shows in the last bits."""
    from syncbn.testing import gloo_calls

    comms.EXCHANGE_MAX_RANKS = 8  # the default, whatever the environment says
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(37, dtype=torch.float64, generator=gen) * 10.0 ** torch.arange(37.0).remainder(9)
    out = {}
    mine = x.clone()
    # The group's first exchange sets up its same-host links: two small all-reduces, once.
    out["first_calls"] = gloo_calls(lambda: comms.all_reduce_sum(torch.zeros(3)))
    out["calls"] = gloo_calls(lambda: comms.all_reduce_sum(mine))
    out["exchanged"] = comms._exchanges(dist.group.WORLD)
    theirs = x.clone()
    dist.all_reduce(theirs)
    out["sum"], out["allreduce"] = mine, theirs
    # A rank whose tensor is a transposed view takes the same path as the others (else they would hang)
    grid = torch.arange(6, dtype=torch.float64).reshape(2, 3) + rank
    view = grid.t() if rank == 0 else grid.t().contiguous()
    out["non_contiguous"] = comms.all_reduce_sum(view).tolist()
    counts = torch.arange(5, dtype=torch.int64) + rank * 10**12
    out["int64"] = comms.all_reduce_sum(counts).tolist()
    out["pairs"] = comms.pairs(None, torch.device("cpu"))
    if out["pairs"]:
        inbox = torch.empty_like(x)
        out["swap"] = (comms.swap(x.clone(), inbox, None), x, inbox)
    # Past EXCHANGE_MAX_RANKS the group's allreduce: a new group, so the cached answer is asked afresh.
    saved, comms.EXCHANGE_MAX_RANKS = comms.EXCHANGE_MAX_RANKS, world_size - 1
    try:
        big = dist.new_group(list(range(world_size)))
        again = x.clone()
        out["big_exchanged"] = comms._exchanges(big)
        out["big_calls"] = gloo_calls(lambda: comms.all_reduce_sum(again, big))
        out["big_sum"] = again
    finally:
        comms.EXCHANGE_MAX_RANKS = saved
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_small_gloo_groups_sum_by_exchange_with_the_same_bits_on_every_rank(world_size, tmp_path):
    per_rank = values(spawn(sums, world_size, tmp_path, timeout=60))
    first = per_rank[0]
    # the additions' order may differ from gloo's ring: equal up to rounding of the terms' magnitudes
    scale = world_size * 4.0 * 10.0 ** torch.arange(37.0, dtype=torch.float64).remainder(9)
    for r in per_rank:
        assert r["exchanged"] and r["calls"] == 1 and not r["big_exchanged"] and r["big_calls"] == 1
        assert r["first_calls"] == (3 if world_size <= comms.EXCHANGE_MAX_RANKS else 1)
        assert torch.equal(r["sum"], first["sum"]), "every rank must hold identical bits"
        assert ((r["sum"] - r["allreduce"]).abs() <= 1e-14 * scale).all(), "the same sum as allreduce"
        assert ((r["big_sum"] - r["allreduce"]).abs() <= 1e-14 * scale).all()
        assert r["int64"] == [world_size * i + 10**12 * sum(range(world_size)) for i in range(5)]
        assert r["pairs"] == (world_size == 2)
        grid = torch.arange(6, dtype=torch.float64).reshape(2, 3) * world_size + sum(range(world_size))
        assert r["non_contiguous"] == grid.t().tolist()
    if world_size == 2:
        assert torch.equal(per_rank[0]["sum"], per_rank[0]["allreduce"])  # a + b, as gloo adds two
        for me, r in enumerate(per_rank):
            rank, sent, received = r["swap"]
            assert (
                rank == me
                and torch.equal(received, per_rank[1 - me]["swap"][1])
                and torch.equal(sent, r["swap"][1])
            )


def test_the_error_gather_runs_on_the_layers_gpu(world_of_one, monkeypatch):
    """NCCL gathers objects on the current GPU: the error gather makes the layer's device current, so ranks
    that never called set_device do not all gather on GPU 0 (tests/test_sync_errors.py runs it on NCCL).
    Here the device context is recorded: it must be entered with the layer's device around the gather."""
    import contextlib

    import torch.distributed as dist

    events = []

    @contextlib.contextmanager
    def device(d):
        events.append(("enter", d))
        yield
        events.append(("exit", d))

    real_gather = dist.all_gather_object

    def gather(out, obj, group=None):
        events.append(("gather", obj))
        real_gather(out, obj, group=group)

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(dist, "all_gather_object", gather)
    gpu1 = torch.device("cuda", 1)
    assert comms.gather_objects("why", None, gpu1) == ["why"]
    assert events == [("enter", gpu1), ("gather", "why"), ("exit", gpu1)]
    events.clear()
    with pytest.raises(ValueError, match="rank 0: bad input"):
        comms.raise_on_all_ranks("bad input", None, gpu1)
    assert events == [("enter", gpu1), ("gather", "bad input"), ("exit", gpu1)]
    events.clear()
    assert comms.gather_objects("why", None, torch.device("cpu")) == ["why"]
    assert events == [("gather", "why")]  # CPU (gloo): no device to make current
