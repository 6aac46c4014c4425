"""Tier 2: bad input raises the same clear ValueError on every rank, never a hang or a process abort.

Each case runs on all ranks inside one spawn; after every error the group must still work, which proves no
rank was left behind in a collective.
"""

from __future__ import annotations

import time

import pytest
import torch

from syncbn import SyncBatchNorm, sync_batch_norm

from .dist import BACKEND, DEVICE, spawn, values

pytestmark = pytest.mark.multiprocess


def _bad_on(rank: int, bad_rank: int, good, bad):
    return bad if rank == bad_rank else good


def error_cases(rank: int, world_size: int) -> list:
    """(name, needs a used layer first, callable) for every invalid-input path."""
    last = world_size - 1
    x = torch.randn(4, 3, 5, device=DEVICE)
    return [
        (
            "rank1d",
            lambda: SyncBatchNorm(3, device=DEVICE)(_bad_on(rank, last, x, torch.randn(7, device=DEVICE))),
        ),
        (
            "wrong_channels",
            lambda: SyncBatchNorm(3, device=DEVICE)(
                _bad_on(rank, last, x, torch.randn(4, 5, 5, device=DEVICE))
            ),
        ),
        (
            "integer_input",
            lambda: SyncBatchNorm(3, device=DEVICE)(
                _bad_on(rank, last, x, torch.ones(4, 3, 5, dtype=torch.long, device=DEVICE))
            ),
        ),
        (
            "ranks_disagree_on_C",
            lambda: SyncBatchNorm(3 + (rank == last), device=DEVICE)(
                torch.randn(4, 3 + (rank == last), 5, device=DEVICE)
            ),
        ),
        ("global_batch_empty", lambda: SyncBatchNorm(3, device=DEVICE)(torch.randn(0, 3, 5, device=DEVICE))),
        (
            "global_one_value",
            lambda: SyncBatchNorm(3, device=DEVICE)(
                _bad_on(rank, 0, torch.randn(0, 3, device=DEVICE), torch.randn(1, 3, device=DEVICE))
            ),
        ),
        (
            "functional_wrong_channels",
            lambda: sync_batch_norm(
                _bad_on(rank, last, x, torch.randn(4, 2, 5, device=DEVICE)),
                None,
                None,
                torch.ones(3, device=DEVICE),
                None,
                training=True,
            ),
        ),
        (
            "functional_disagree_no_params",
            lambda: sync_batch_norm(
                torch.randn(4, 3 + (rank == last), 5, device=DEVICE), None, None, training=True
            ),
        ),
    ]


def later_call_cases(rank: int, world_size: int) -> list:
    """The same local errors on a layer that already synced once (past its first-call check)."""
    last = world_size - 1
    cases = []
    for name, bad in [
        ("later_rank1d", torch.randn(7, device=DEVICE)),
        ("later_wrong_channels", torch.randn(4, 6, 5, device=DEVICE)),
        ("later_integer_input", torch.ones(4, 3, 5, dtype=torch.int32, device=DEVICE)),
    ]:
        layer = SyncBatchNorm(3, device=DEVICE)
        layer(torch.randn(4, 3, 5, device=DEVICE))  # first call: the channel check runs and passes

        def call(layer=layer, bad=bad):
            layer(_bad_on(rank, last, torch.randn(4, 3, 5, device=DEVICE), bad))

        cases.append((name, call))
    return cases


def run_errors(rank: int, world_size: int) -> dict:
    results = {}
    for name, call in error_cases(rank, world_size) + later_call_cases(rank, world_size):
        start = time.monotonic()
        try:
            call()
            results[name] = (None, "", time.monotonic() - start)
        except Exception as e:
            results[name] = (type(e).__name__, str(e), time.monotonic() - start)
    # The group is still in step: a normal synced call works after all those errors.
    layer = SyncBatchNorm(3, device=DEVICE)
    y = layer(torch.randn(4, 3, 5, device=DEVICE))
    results["still_works"] = (None, str(tuple(y.shape)), 0.0)
    return results


EXPECTED = {
    "rank1d": ["1D input", "(7,)"],
    "wrong_channels": ["expected C=3 channels, got 5"],
    "integer_input": ["floating point", "torch.int64"],
    "ranks_disagree_on_C": ["disagree", "C=3", "C=4"],
    "global_batch_empty": ["empty", "0 values per channel"],
    "global_one_value": ["more than 1 value per channel", "1 value"],
    "functional_wrong_channels": ["expected C=3 channels, got 2"],
    "functional_disagree_no_params": ["disagree"],
    "later_rank1d": ["1D input"],
    "later_wrong_channels": ["expected C=3 channels, got 6"],
    "later_integer_input": ["floating point", "torch.int32"],
}


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_raises_the_same_clear_error(world_size, tmp_path):
    per_rank = values(spawn(run_errors, world_size, tmp_path, timeout=90, pg_timeout=20))
    for name, fragments in EXPECTED.items():
        for rank, results in enumerate(per_rank):
            kind, message, seconds = results[name]
            assert kind == "ValueError", f"{name} on rank {rank}: {kind} {message}"
            for fragment in fragments:
                assert fragment in message, f"{name} on rank {rank}: {fragment!r} not in {message!r}"
            assert seconds < 10, f"{name} on rank {rank} took {seconds:.1f}s"
        # The rank that failed is named on every rank, so users find the culprit from any log.
        if "disagree" not in fragments[0] and name.startswith(("rank1d", "wrong", "integer", "later")):
            assert all(f"rank {world_size - 1}" in results[name][1] for results in per_rank), name
    assert all(results["still_works"][1] == "(4, 3, 5)" for results in per_rank)


def kernel_failure(rank: int, world_size: int) -> dict:
    """A kernel that fails on one rank only (out of memory, say) still joins the collective and the error
    reaches every rank, in forward and in backward, instead of leaving the others waiting."""
    from syncbn import kernels

    out = {}
    for name, attr in (("forward", "pack_moments"), ("backward", "reduce_grads")):
        layer = SyncBatchNorm(3)
        layer(torch.randn(4, 3, 2)).sum().backward()  # past the first-call check
        real = getattr(kernels, attr)

        def fail(*args, attr=attr, **kwargs):
            raise RuntimeError(f"simulated {attr} failure")

        if rank == 1:
            setattr(kernels, attr, fail)
        try:
            layer(torch.randn(4, 3, 2)).sum().backward()
            out[name] = ("none", "")
        except Exception as e:
            out[name] = (type(e).__name__, str(e))
        finally:
            setattr(kernels, attr, real)
    return out


def test_a_kernel_failure_on_one_rank_raises_on_every_rank(tmp_path):
    for r in values(spawn(kernel_failure, 2, tmp_path, timeout=60)):
        assert r["forward"] == (
            "ValueError",
            "SyncBatchNorm failed on rank 1: RuntimeError: simulated pack_moments failure",
        )
        assert r["backward"] == (
            "ValueError",
            "SyncBatchNorm failed on rank 1: RuntimeError: simulated reduce_grads failure",
        )


def errors_without_set_device(rank: int, world_size: int) -> dict:
    """NCCL ranks that never called ``torch.cuda.set_device`` (the model moved with ``.to(f"cuda:{rank}")``):
    GPU 0 is current on every rank. Each error path gathers every rank's reason, which NCCL does on the
    current GPU; it must use the layer's GPU, or all ranks meet on GPU 0 and NCCL fails instead."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda", rank)
    good = torch.randn(4, 3, 5, device=dev)
    out = {}

    def attempt(name, call):
        try:
            call()
            out[name] = ("none", "")
        except Exception as e:
            out[name] = (type(e).__name__, str(e))

    first = SyncBatchNorm(3).to(dev)
    attempt(
        "first_call_wrong_channels", lambda: first(good if rank == 0 else torch.randn(4, 5, 5, device=dev))
    )
    later = SyncBatchNorm(3).to(dev)
    later(good)  # past its first-call check
    attempt("later_rank1d", lambda: later(good if rank == 0 else torch.randn(7, device=dev)))
    a, b = SyncBatchNorm(3).to(dev), SyncBatchNorm(3).to(dev)
    a(good)  # both past their first-call checks, in the same order on every rank
    b(good)
    attempt("mispaired", lambda: (a if rank == 0 else b)(good))  # each rank runs another layer
    out["still_works"] = tuple(SyncBatchNorm(3).to(dev)(good).shape)
    return out


@pytest.mark.gpu
@pytest.mark.skipif(BACKEND != "nccl", reason="NCCL only (SYNCBN_TEST_BACKEND=nccl, 2+ GPUs; make test-gpu)")
def test_errors_over_nccl_without_set_device(tmp_path):
    for r in values(spawn(errors_without_set_device, 2, tmp_path, timeout=120)):
        kind, message = r["first_call_wrong_channels"]
        assert kind == "ValueError" and "rank 1" in message and "expected C=3 channels, got 5" in message
        kind, message = r["later_rank1d"]
        assert kind == "ValueError" and "rank 1" in message and "1D input" in message
        kind, message = r["mispaired"]
        assert kind == "RuntimeError" and "mispaired" in message
        assert r["still_works"] == (4, 3, 5)
