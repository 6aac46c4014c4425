"""The one place syncbn talks to ``torch.distributed``.

Every helper is safe when torch.distributed is unavailable or not initialized (world size 1), so the
same layer code runs in a notebook, under gloo on a laptop and under NCCL on a cluster.
"""

from __future__ import annotations

from typing import NoReturn, Optional

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


def all_reduce_sum(tensor: torch.Tensor, process_group: ProcessGroup = None) -> torch.Tensor:
    """Sum ``tensor`` in place over the group (synchronously) and return it."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=process_group)
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
