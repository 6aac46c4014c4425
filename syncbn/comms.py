"""The one place syncbn talks to ``torch.distributed`` (with links.py, its same-host transport).

Every helper is safe when torch.distributed is unavailable or not initialized (world size 1), so the
same layer code runs in a notebook, under gloo on a laptop and under NCCL on a cluster.
"""

from __future__ import annotations

import datetime
import os
import weakref
from typing import Any, NoReturn, Optional

import torch
import torch.distributed as dist

from . import links

ProcessGroup = Optional["dist.ProcessGroup"]

_TIMEOUT: datetime.timedelta | None = None
_DEBUG = os.environ.get("SYNCBN_DEBUG", "0") not in ("", "0")
# Keyed weakly by the default group, so that destroy_process_group() really frees the world and SyncBN's
# copy of it: a gloo group still alive when Python finalizes can abort the process (README
# "Troubleshooting"), and holding the world here kept it alive past the user's destroy_process_group().
_PRIVATE_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _WorldToken:
    """Stands for one default process group without keeping it alive."""

    __slots__ = ("__weakref__",)  # a weak key where the group itself is None (NCCL's, used as given)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(process_group: ProcessGroup = None) -> int:
    """Number of ranks in ``process_group`` (default: the world); 1 when not distributed."""
    if not is_initialized():
        return 1
    return dist.get_world_size(process_group)


def rank(process_group: ProcessGroup = None) -> int:
    """This process's rank inside ``process_group``; 0 when not distributed."""
    if not is_initialized():
        return 0
    return dist.get_rank(process_group)


def world_token() -> Any:
    """An object that changes whenever the default process group is (re)created; None when not distributed.

    Layers key their cached group on it, so a destroyed and re-initialized world is never used stale.
    It does not reference the group: a layer that outlives destroy_process_group() does not keep it alive.
    """
    if not is_initialized():
        return None
    world = dist.group.WORLD
    token = _TOKENS.get(world)
    if token is None:
        token = _TOKENS[world] = _WorldToken()
    return token


def set_timeout(timeout: datetime.timedelta | float | None) -> None:
    """Tell syncbn the timeout the job gave ``init_process_group`` (a timedelta or seconds; None: torch's
    default). SyncBN's private gloo group uses it, so a stuck SyncBN collective fails after the same time
    as the job's own. Call it once after ``init_process_group``; groups created before keep theirs.
    """
    global _TIMEOUT
    if timeout is not None and not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    if timeout is not None and timeout.total_seconds() <= 0:
        raise ValueError(f"syncbn.comms.set_timeout: the timeout must be positive, got {timeout}")
    _TIMEOUT = timeout


def timeout() -> datetime.timedelta:
    """The timeout of SyncBN's private groups: the one given to :func:`set_timeout`, else torch's default."""
    return _TIMEOUT if _TIMEOUT is not None else dist.default_pg_timeout


def set_debug(enabled: bool) -> None:
    """Debug mode (also ``SYNCBN_DEBUG=1``): before each SyncBN collective, all ranks exchange a fixed-size
    fingerprint of it, so calls mispaired across layers of different width raise on every rank instead of
    aborting gloo (or hanging NCCL). One extra small all-reduce per collective; set it on every rank."""
    global _DEBUG
    _DEBUG = bool(enabled)


def debug() -> bool:
    return _DEBUG


def private_group(process_group: ProcessGroup = None) -> ProcessGroup:
    """The group SyncBN's collectives run on: for gloo, a private copy of ``process_group``.

    Same ranks; the timeout is :func:`timeout`. Why a copy: when one rank stops running the layers (say
    it is in eval mode while the others train), its next collective elsewhere (DDP's gradient all-reduce)
    would be paired by gloo with our stats all-reduce, and gloo aborts the process on the size mismatch.
    On separate groups the ranks wait on different collectives and fail at the timeout with an error that
    says why. Created on a layer's first synced call; NCCL groups and subgroups are used as given.
    """
    # Only the world group gets a copy: its first synced call is reached by every rank together. A
    # subgroup's copy would need its members to meet while the other ranks do something else, which
    # torch 2.13's locally synchronized new_group does not survive reliably (it can hang).
    if process_group not in (None, dist.group.WORLD) or dist.get_backend(process_group) != "gloo":
        return process_group
    group = dist.group.WORLD
    private = _PRIVATE_GROUPS.get(group)
    if private is None:
        ranks = dist.get_process_group_ranks(group)
        try:
            private = dist.new_group(ranks, timeout=timeout(), backend="gloo", use_local_synchronization=True)
        except RuntimeError as e:  # the peers never arrived: usually a rank that is not training the layer
            raise RuntimeError(
                f"SyncBatchNorm: setting up its process group failed on rank {rank()} of {len(ranks)} "
                f"({type(e).__name__}: {e}). {_LIKELY_CAUSE}"
            ) from e
        _PRIVATE_GROUPS[group] = private
    return private


# The point-to-point slot (tag) of SyncBN's exchanges; gloo's collectives use other slots.
_EXCHANGE_TAG = 0x5BC0
# Up to this many ranks, sum by direct exchange (W - 1 messages per rank), which beats gloo's allreduce
# on latency. SYNCBN_EXCHANGE_MAX_RANKS=1 (the same on every rank) always uses the allreduce.
EXCHANGE_MAX_RANKS = int(os.environ.get("SYNCBN_EXCHANGE_MAX_RANKS", "8"))
# group -> whether its CPU tensors are summed by exchange; weak, like _PRIVATE_GROUPS
_EXCHANGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_INBOXES: dict = {}


def _group_or_world(process_group: ProcessGroup) -> Any:
    """``process_group``, or the default group for None (the same fast paths for both)."""
    return dist.group.WORLD if process_group is None else process_group


def _exchanges(group: dist.ProcessGroup) -> bool:
    """Whether SyncBN sums over ``group`` by direct exchange: gloo, 2 to EXCHANGE_MAX_RANKS ranks."""
    known = _EXCHANGES.get(group)
    if known is None:
        known = _EXCHANGES[group] = (
            dist.get_backend(group) == "gloo" and 2 <= group.size() <= EXCHANGE_MAX_RANKS
        )
    return known


def _send_recv(group: dist.ProcessGroup, tensor: torch.Tensor, inboxes: dict[int, torch.Tensor]) -> None:
    """Send ``tensor`` to every peer in ``inboxes`` and receive each peer's tensor into its inbox: over
    same-host links where the group has them (syncbn/links.py), else by gloo's send and recv."""
    peers = links.links(group, timeout().total_seconds())
    if peers is not None and tensor.nbytes <= links.LINK_MAX_BYTES:
        peers.exchange(tensor, inboxes)
        return
    sends = [group.send([tensor], r, _EXCHANGE_TAG) for r in inboxes]
    recvs = [group.recv([inbox], r, _EXCHANGE_TAG) for r, inbox in inboxes.items()]
    for work in recvs + sends:  # the sends too: the caller may overwrite what they read
        work.wait()


def _exchange_sum(tensor: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Sum a CPU tensor over a small gloo group by direct exchange: one round of point-to-point messages
    (every rank sends its tensor to every other rank), run by the calling thread.

    gloo's allreduce hands each call to a worker thread and runs a ring of 2(W - 1) steps; at SyncBN's
    payload sizes that hand-off and those steps are the cost (README "Benchmarks"). Every rank adds the
    same rows in rank order, so all ranks get identical bits, as with allreduce. A message of another size
    raises on every rank over same-host links and aborts gloo, as allreduce does, across machines (README
    "Exact semantics").
    """
    me, size = group.rank(), group.size()
    key = (tensor.shape, tensor.dtype, size)
    inbox = _INBOXES.get(key)
    if inbox is None:
        if len(_INBOXES) > 1024:  # one entry per payload size: bounded by the model's widths
            _INBOXES.clear()
        inbox = _INBOXES[key] = torch.empty((size, *tensor.shape), dtype=tensor.dtype).unbind()
    _send_recv(group, tensor, {r: inbox[r] for r in range(size) if r != me})
    if size == 2:
        tensor.add_(inbox[1 - me])  # a + b == b + a in IEEE arithmetic: the same bits on both ranks
        return
    inbox[me].copy_(tensor)
    torch.add(inbox[0], inbox[1], out=tensor)
    for row in inbox[2:]:
        tensor.add_(row)


def pairs(process_group: ProcessGroup, device: torch.device) -> bool:
    """Whether SyncBN's payloads on ``device`` go by :func:`swap` over ``process_group``: CPU tensors on a
    gloo group of exactly two ranks. The same answer on both ranks (it depends on the group only)."""
    group = _group_or_world(process_group)
    return (
        device.type == "cpu"
        and isinstance(group, dist.ProcessGroup)
        and group.size() == 2
        and _exchanges(group)
    )


def swap(tensor: torch.Tensor, inbox: torch.Tensor, process_group: ProcessGroup) -> int:
    """Send a contiguous CPU ``tensor`` to the other rank of a two-rank group (:func:`pairs`) and receive
    its tensor into ``inbox``; return this rank (0 or 1). The caller combines the two in rank order, fused
    with the op that needs them: one dispatch fewer than summing first."""
    group = _group_or_world(process_group)
    me = group.rank()
    try:
        _send_recv(group, tensor, {1 - me: inbox})
    except (RuntimeError, OSError) as e:  # OSError: a same-host link's timeout
        raise _failure(tensor, group, e) from e
    return me


_LIKELY_CAUSE = (
    "Likely cause: another rank did not run this layer in training mode at the same step (it skipped the "
    "layer, was in eval mode, took another code path) or died. Every rank must call each SyncBatchNorm "
    "layer in training mode equally often."
)


def all_reduce_sum(tensor: torch.Tensor, process_group: ProcessGroup = None) -> torch.Tensor:
    """Sum ``tensor`` in place over the group (synchronously) and return it: CPU tensors on a gloo group of
    up to ``EXCHANGE_MAX_RANKS`` ranks by direct exchange, everything else by the group's allreduce.

    A failure here (the process group's timeout, a peer that died or sent something else) almost always
    means the ranks stopped calling this layer in step; the error says so instead of only "timed out".
    """
    process_group = _group_or_world(process_group)  # NCCL's default group has no private copy
    try:
        if not isinstance(process_group, dist.ProcessGroup):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
        elif tensor.device.type == "cpu" and _exchanges(process_group):
            # The path may not depend on this rank's layout: every rank must take the same one.
            flat = tensor.contiguous()
            _exchange_sum(flat, process_group)
            if flat is not tensor:
                tensor.copy_(flat)
        else:
            # The group's own allreduce (what dist.all_reduce ends in), without the wrapper's per-call
            # checks and logging: about 10 us per call, twice per layer step.
            process_group.allreduce([tensor]).wait()
    except (RuntimeError, OSError) as e:  # DistBackendError, gloo/NCCL and link timeouts
        raise _failure(tensor, process_group, e) from e
    return tensor


def _failure(tensor: torch.Tensor, process_group: ProcessGroup, error: Exception) -> RuntimeError:
    return RuntimeError(
        f"SyncBatchNorm: all-reduce of {tensor.numel()} statistics failed on rank {rank(process_group)} "
        f"of {world_size(process_group)}. {_LIKELY_CAUSE} Original error: {error}"
    )


def gather_objects(obj: Any, process_group: ProcessGroup = None, device: torch.device | None = None) -> list:
    """Every rank's ``obj``, in rank order. Off the hot path: only for error messages.

    NCCL gathers objects through tensors on the *current* CUDA device, which is GPU 0 on every rank that
    never called ``torch.cuda.set_device`` (its model moved with ``.to(f"cuda:{local_rank}")``): all ranks
    on one GPU, an NCCL error instead of ours. So the layer's ``device`` is made current for the gather.
    """
    gathered: list = [None] * world_size(process_group)
    if device is not None and device.type == "cuda":
        with torch.cuda.device(device):
            dist.all_gather_object(gathered, obj, group=process_group)
    else:
        dist.all_gather_object(gathered, obj, group=process_group)
    return gathered


def raise_on_all_ranks(
    local_error: str | None, process_group: ProcessGroup = None, device: torch.device | None = None
) -> NoReturn:
    """Raise the same ValueError on every rank, naming each failing rank and its reason.

    Only called once every rank already knows that *some* rank failed (a reduced flag says so), so all
    ranks enter this exchange together; it is off the hot path and may cost two small collectives.
    """
    failed = [f"rank {r}: {m}" for r, m in enumerate(gather_objects(local_error, process_group, device)) if m]
    raise ValueError("SyncBatchNorm failed on " + "; ".join(failed or ["an unknown rank"]))


def check_num_features(
    num_features: int,
    device: torch.device,
    process_group: ProcessGroup = None,
    local_error: str | None = None,
) -> None:
    """Check that all ranks agree on the channel count before the first stats all-reduce.

    The stats vector has 2C+5 entries, so ranks that disagree on C would hand gloo buffers of different
    sizes, which aborts the process (NCCL hangs instead). This fixed-size exchange (W numbers) turns that
    into a ValueError on every rank. A rank that already knows its input is bad sends -1.
    """
    size, me = world_size(process_group), rank(process_group)
    counts = torch.zeros(size, dtype=torch.int64, device=device)
    counts[me] = -1 if local_error else num_features
    all_reduce_sum(counts, process_group)
    seen = counts.tolist()
    if any(c < 0 for c in seen):
        raise_on_all_ranks(local_error, process_group, device)
    if len(set(seen)) > 1:
        per_rank = ", ".join(f"rank {r}: C={c}" for r, c in enumerate(seen))
        raise ValueError(
            f"SyncBatchNorm: ranks disagree on the number of channels ({per_rank}); every rank must build "
            "the same model so each layer syncs the same channels"
        )


def resolve_group(process_group: Any) -> ProcessGroup:
    """The ProcessGroup a layer syncs over: ``process_group`` itself, or the group of a 1-D ``DeviceMesh``.

    FSDP2/torchtitan code holds its groups as meshes (``mesh["dp"]``); a mesh of more dims is ambiguous.
    """
    if not dist.is_available():
        return process_group
    from torch.distributed.device_mesh import DeviceMesh  # lazy: only needed when a mesh may be passed

    if not isinstance(process_group, DeviceMesh):
        return process_group
    if process_group.ndim != 1:
        raise ValueError(
            f"SyncBatchNorm: process_group must be a 1-D DeviceMesh (e.g. mesh['dp']), got a "
            f"{process_group.ndim}-D mesh of shape {tuple(process_group.shape)} with dims "
            f"{process_group.mesh_dim_names}"
        )
    return process_group.get_group()


def group_name(process_group: ProcessGroup) -> str:
    """A name that :func:`group_by_name` turns back into ``process_group`` ("" for the default group)."""
    return "" if process_group is None else process_group.group_name


def group_by_name(name: str) -> ProcessGroup:
    """The process group torch registered under ``name`` (``ProcessGroup.group_name``); None for ""."""
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)
