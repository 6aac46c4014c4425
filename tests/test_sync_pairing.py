"""Tier 2: SyncBN calls that ranks pair up wrongly raise on every rank, naming the rank and the layer.

The mistakes users make (a NaN-loss guard that skips one backward, a forward under no_grad, a layer skipped
by control flow on one rank) are run on W=2 and W=3; each must end in a RuntimeError on every rank, never a
silent wrong number or a gloo abort. Debug mode covers layers of different width; what aborts without it is
pinned too, so the README's list stays true.
"""

from __future__ import annotations

import re
import time

import pytest
import torch
from torch import nn

from syncbn import SyncBatchNorm, comms

from .dist import spawn, values
from .reference import reference_bn, rel_err

pytestmark = pytest.mark.multiprocess


def _step(layers: list, rank: int, *, skip_backward=False, no_grad=False, skip_layer=None) -> None:
    """One training step through ``layers`` on this rank's (3, C, 4) batch."""
    x = torch.randn(3, layers[0].num_features, 4, generator=torch.Generator().manual_seed(rank))
    x.requires_grad_(True)
    with torch.set_grad_enabled(not no_grad):
        y = x
        for i, layer in enumerate(layers):
            if i != skip_layer:
                y = layer(y)
    if not (skip_backward or no_grad):
        y.square().sum().backward()


def _outcome(fn) -> tuple[str, str]:
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
    return "none", ""


def _timed(fn) -> tuple[str, str, float]:
    start = time.monotonic()
    return (*_outcome(fn), time.monotonic() - start)


def mistakes(rank: int, world_size: int, culprit: int) -> dict:
    """Each mistake on rank ``culprit`` after one good step; returns (error type, message, layer ids)."""
    out = {}
    for name, bad in [
        ("skipped_backward", {"skip_backward": True}),
        ("no_grad_forward", {"no_grad": True}),
        ("skipped_layer", {"skip_layer": 1}),
    ]:
        layers = [SyncBatchNorm(5), SyncBatchNorm(5), SyncBatchNorm(5)]  # one width: same-size payloads
        _step(layers, rank)

        def mistake(layers=layers, bad=bad):
            _step(layers, rank, **(bad if rank == culprit else {}))
            _step(layers, rank)  # the culprit's next step meets the others' unfinished one

        out[name] = (*_timed(mistake), [layer._sync_state.layer_id for layer in layers])
    # The ranks are back in step after every error: a new layer syncs and matches the reference.
    x = torch.randn(2 * world_size, 3, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y = SyncBatchNorm(3, dtype=torch.float64)(x[2 * rank : 2 * rank + 2])
    out["still_works"] = rel_err(y, reference_bn(3, 3)(x)[2 * rank : 2 * rank + 2])
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_mispaired_calls_raise_on_every_rank_naming_rank_and_layer(world_size, tmp_path):
    culprit = world_size - 1
    per_rank = values(spawn(mistakes, world_size, tmp_path, culprit, timeout=120, pg_timeout=30))
    for name, layer_index in [("skipped_backward", 2), ("no_grad_forward", 2), ("skipped_layer", 1)]:
        ids = per_rank[0][name][3]
        assert all(r[name][3] == ids for r in per_rank), "layer ids must agree across ranks"
        layer = f"layer #{ids[layer_index]}"
        for rank, r in enumerate(per_rank):
            kind, message, seconds, _ = r[name]
            assert seconds < 10, f"{name} on rank {rank} took {seconds:.1f}s"
            assert kind == "RuntimeError", (name, rank, kind, message)
            assert "mispaired" in message and f"rank {culprit}" in message and layer in message, message
            # every rank's message says what the culprit and the others were doing
            others = "rank 0" if world_size == 2 else "ranks 0, 1"
            assert others in message, message
        if name != "skipped_layer":  # a forward met a backward
            assert "forward of SyncBatchNorm" in per_rank[0][name][1]
            assert "backward of SyncBatchNorm" in per_rank[0][name][1]
        else:  # layer 1 on the others met layer 2 on the culprit
            assert f"layer #{ids[2]}" in per_rank[0][name][1]
    assert all(r["still_works"] < 1e-12 for r in per_rank)


def _widths_differ(rank: int) -> tuple[str, str]:
    torch.manual_seed(0)
    layers = [SyncBatchNorm(4), nn.Conv1d(4, 6, 1), SyncBatchNorm(6)]
    _step(layers, rank)
    return _outcome(lambda: (_step(layers, rank, skip_backward=rank == 1), _step(layers, rank)))


def debug_mode(rank: int, world_size: int) -> dict:
    """Layers of different width, skipped backward on rank 1: backward of C=6 meets forward of C=4."""
    assert comms.debug(), "SYNCBN_DEBUG=1 reaches every rank"
    out = {"debug": _widths_differ(rank)}
    # A layer's first call (the fixed-size channel check) meeting another layer's payload, in debug mode.
    first = [SyncBatchNorm(4), SyncBatchNorm(4)]
    _step(first[:1], rank)
    out["first_call"] = _outcome(lambda: first[rank](torch.randn(3, 4, 2)))
    return out


def test_debug_mode_turns_size_mismatches_into_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNCBN_DEBUG", "1")  # what users set; the spawned ranks read it at import
    per_rank = values(spawn(debug_mode, 2, tmp_path, timeout=90))
    for r in per_rank:
        kind, message = r["debug"]
        assert kind == "RuntimeError" and "mispaired" in message, message
        assert "rank 0: backward of SyncBatchNorm layer" in message and "(C=6" in message, message
        assert "rank 1: forward of SyncBatchNorm layer" in message and "(C=4" in message, message
        kind, message = r["first_call"]
        assert kind == "RuntimeError" and "channel check" in message, message


def test_without_debug_mode_a_size_mismatch_on_one_host_raises_on_every_rank(tmp_path, monkeypatch):
    """Without SYNCBN_DEBUG, layers of different width: on one machine the same-host links see the
    message sizes differ, so every rank raises (and the links stay usable); gloo would abort."""
    monkeypatch.delenv("SYNCBN_DEBUG", raising=False)
    monkeypatch.delenv("SYNCBN_LINKS", raising=False)
    for r in values(spawn(_mismatch_case, 2, tmp_path, timeout=60)):
        kind, message = r["outcome"]
        assert kind == "RuntimeError" and "Likely cause" in message, message
        assert re.search(r"rank \d sent \d+ bytes where this call expects \d+", message), message
        assert r["after"] == [2.0, 2.0]


def _mismatch_case(rank: int, world_size: int) -> dict:
    assert not comms.debug()
    outcome = _widths_differ(rank)
    return {"outcome": outcome, "after": comms.all_reduce_sum(torch.ones(2)).tolist()}


def test_without_debug_mode_or_links_a_size_mismatch_aborts_gloo(tmp_path, monkeypatch):
    """What the README says aborts without SYNCBN_DEBUG across machines (gloo carries the messages; here
    SYNCBN_LINKS=0 stands in for a second host): the same mistake with layers of different width."""
    monkeypatch.delenv("SYNCBN_DEBUG", raising=False)
    monkeypatch.setenv("SYNCBN_LINKS", "0")
    with pytest.raises(AssertionError, match="died without reporting"):
        spawn(_abort_case, 2, tmp_path, timeout=60)


def _abort_case(rank: int, world_size: int):
    assert not comms.debug()
    return _widths_differ(rank)


def eval_alone(rank: int, world_size: int) -> dict:
    """Rank-0-only validation between training steps is legitimate: no collective, no error, exact. Rank 0
    also built and evaluated SyncBatchNorm layers of its own before the model: no false alarm either."""
    if rank == 0:
        for layer in [SyncBatchNorm(3), SyncBatchNorm(3)]:
            layer.eval()(torch.randn(5, 3))
    gen = torch.Generator().manual_seed(4)
    net = nn.Sequential(SyncBatchNorm(3, dtype=torch.float64), SyncBatchNorm(3, dtype=torch.float64))
    ref = nn.Sequential(reference_bn(3, 3), reference_bn(3, 3))
    errors = []
    for step in range(3):
        xg = torch.randn(2 * world_size, 3, 4, generator=gen, dtype=torch.float64)
        y = net(xg[2 * rank : 2 * rank + 2].clone())
        errors.append(rel_err(y, ref(xg)[2 * rank : 2 * rank + 2]))
        if rank == 0 and step < 2:
            net.eval()
            with torch.no_grad():
                net(torch.randn(7, 3, 4, dtype=torch.float64))
            net.train()
    errors.append(rel_err(net[1].running_var, ref[1].running_var))
    return errors


def test_eval_on_one_rank_alone_needs_no_collective(tmp_path):
    for errors in values(spawn(eval_alone, 2, tmp_path)):
        assert max(errors) < 1e-12, errors


def eval_from_the_start(rank: int, world_size: int) -> tuple[str, str]:
    """Rank 1 evaluates from its very first call while rank 0 trains: rank 0 fails with the SyncBN hint."""
    comms.set_timeout(3)  # SyncBN's own group gives up after 3 s; the world group keeps its 30 s
    layer = SyncBatchNorm(3)
    if rank == 1:
        layer.eval()
    outcome = _outcome(lambda: layer(torch.randn(4, 3)))
    torch.distributed.barrier()  # rank 1 waits here for rank 0's failure
    return outcome


def test_eval_from_the_start_on_one_rank_names_the_cause(tmp_path):
    first, second = values(spawn(eval_from_the_start, 2, tmp_path, timeout=60))
    assert first[0] == "RuntimeError" and "SyncBatchNorm" in first[1] and "Likely cause" in first[1], first
    assert second == ("none", "")


def test_call_tag_rows_wrap_and_come_in_blocks():
    """The call row of any call index is [b, b^2] with b = index mod TAG_LIMIT, across block and wrap
    boundaries; a model step reuses its block's rows with no dispatch."""
    from syncbn import pairing
    from syncbn.testing import aten_ops

    cpu = torch.device("cpu")
    limit, block = pairing.TAG_LIMIT, pairing._CALL_BLOCK
    for index in (0, 1, block - 1, block, limit - 1, limit, limit + block + 3, 5 * limit + 7):
        call, code = pairing.tail_parts(3, index, False, cpu)
        b = index % limit
        assert call.tolist() == [b, b * b], index
        assert code.tolist() == [pairing.layer_code(3, False), pairing.layer_code(3, False) ** 2]
    pairing.tail_parts(3, 10 * block, True, cpu)
    assert aten_ops(lambda: pairing.tail_parts(3, 10 * block + 1, True, cpu)) == []
