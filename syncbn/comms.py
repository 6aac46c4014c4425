"""The one place syncbn talks to ``torch.distributed``.

Every helper is safe when torch.distributed is unavailable or not initialized (world size 1), so the
same layer code runs in a notebook, under gloo on a laptop and under NCCL on a cluster.
"""

from __future__ import annotations

from typing import Any, NoReturn, Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional["dist.ProcessGroup"]


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


_PRIVATE_GROUPS: dict = {}


def private_group(process_group: ProcessGroup = None) -> ProcessGroup:
    """The group SyncBN's collectives run on: for gloo, a private copy of ``process_group``.

    Same ranks, same timeout. Why a copy: when one rank stops running the layers (say it is in eval mode
    while the others train), its next collective elsewhere (DDP's gradient all-reduce) would be paired by
    gloo with our stats all-reduce, and gloo aborts the process on the size mismatch. On separate groups
    the ranks wait on different collectives and fail at the timeout with an error that says why. Created
    on a layer's first synced call; NCCL groups and subgroups are used as given.
    """
    # Only the world group gets a copy: its first synced call is reached by every rank together. A
    # subgroup's copy would need its members to meet while the other ranks do something else, which
    # torch 2.13's locally synchronized new_group does not survive reliably (it can hang).
    if process_group not in (None, dist.group.WORLD) or dist.get_backend(process_group) != "gloo":
        return process_group
    group = dist.group.WORLD
    private = _PRIVATE_GROUPS.get(group)
    if private is None:
        timeout = group._get_backend(torch.device("cpu")).options._timeout
        ranks = dist.get_process_group_ranks(group)
        private = dist.new_group(ranks, timeout=timeout, backend="gloo", use_local_synchronization=True)
        _PRIVATE_GROUPS[group] = private
    return private


def all_reduce_sum(tensor: torch.Tensor, process_group: ProcessGroup = None) -> torch.Tensor:
    """Sum ``tensor`` in place over the group (synchronously) and return it.

    A failure here (the process group's timeout, a peer that died or sent something else) almost always
    means the ranks stopped calling this layer in step; the error says so instead of only "timed out".
    """
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
    except RuntimeError as e:  # DistBackendError and gloo/NCCL timeouts are RuntimeErrors
        raise RuntimeError(
            f"SyncBatchNorm: all-reduce of {tensor.numel()} statistics failed on rank {rank(process_group)} "
            f"of {world_size(process_group)}. Likely cause: another rank did not run this layer in training "
            "mode at the same step (it skipped the layer, was in eval mode, took another code path) or died. "
            f"Every rank must call each SyncBatchNorm layer equally often. Original error: {e}"
        ) from e
    return tensor


def raise_on_all_ranks(local_error: str | None, process_group: ProcessGroup = None) -> NoReturn:
    """Raise the same ValueError on every rank, naming each failing rank and its reason.

    Only called once every rank already knows that *some* rank failed (a reduced flag says so), so all
    ranks enter this exchange together; it is off the hot path and may cost two small collectives.
    """
    messages: list = [None] * world_size(process_group)
    dist.all_gather_object(messages, local_error, group=process_group)
    failed = [f"rank {r}: {m}" for r, m in enumerate(messages) if m]
    raise ValueError("SyncBatchNorm failed on " + "; ".join(failed or ["an unknown rank"]))


def check_num_features(
    num_features: int,
    device: torch.device,
    process_group: ProcessGroup = None,
    local_error: str | None = None,
) -> None:
    """Check that all ranks agree on the channel count before the first stats all-reduce.

    The stats vector has 2C+1 entries, so ranks that disagree on C would hand gloo buffers of different
    sizes, which aborts the process (NCCL hangs instead). This fixed-size exchange (W numbers) turns that
    into a ValueError on every rank. A rank that already knows its input is bad sends -1.
    """
    size, me = world_size(process_group), rank(process_group)
    counts = torch.zeros(size, dtype=torch.int64, device=device)
    counts[me] = -1 if local_error else num_features
    all_reduce_sum(counts, process_group)
    seen = counts.tolist()
    if any(c < 0 for c in seen):
        raise_on_all_ranks(local_error, process_group)
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
