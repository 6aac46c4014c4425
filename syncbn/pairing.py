"""Call tags: catch SyncBatchNorm calls that ranks pair up wrongly, and raise on every rank instead.

Every stats all-reduce carries, next to the statistics, a tag per rank: which layer, which of its synced
calls, forward or backward. Each tag number t rides as (t, t^2); after the sum every rank checks
``sum t == W t`` and ``sum t^2 == W t^2``, which hold on all ranks exactly when all tags agree (and fail
on all ranks otherwise: the t^2 column has zero spread only then). So the verdict is free and the same
everywhere. See README "Exact semantics" for what a tag cannot see.
"""

from __future__ import annotations

import torch

from . import comms

# Tag numbers stay below 2^16, so W * t^2 stays an exact float64 integer for W < 2^21 ranks.
TAG_LIMIT = 1 << 16
TAIL = 5  # payload tail: count slot, b, b^2, a, a^2 (b = call index, a = layer code)

_ROWS: dict = {}  # device -> (TAG_LIMIT, 2) float64 table of [t, t^2]
_CODES: dict = {}  # (layer code, device) -> [a, a^2] view of that table
_CALLS: dict = {}  # (call index mod TAG_LIMIT, device) -> [b, b^2] view: shared by every layer at a step
_CALL_BLOCK = 256  # call rows are cut from the table this many at a time: no dispatch on most steps


def _table(device: torch.device) -> torch.Tensor:
    rows = _ROWS.get(device)
    if rows is None:
        t = torch.arange(TAG_LIMIT, dtype=torch.float64, device=device)
        rows = _ROWS[device] = torch.stack([t, t * t], 1)
    return rows


def layer_code(layer_id: int, backward: bool) -> int:
    return (2 * layer_id + int(backward)) % TAG_LIMIT


def tail_parts(
    layer_id: int, call_index: int, backward: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two tag pieces of a payload tail: ``[b, b^2]`` (call) and ``[a, a^2]`` (layer, pass).

    Both are cached views of a per-device table, so writing a tail costs a share of the payload's ``cat``.
    Call rows are cut ``_CALL_BLOCK`` at a time (one slice and one unbind per 256 steps of the model).
    """
    code = _CODES.get((layer_code(layer_id, backward), device))
    if code is None:
        code = _CODES[(layer_code(layer_id, backward), device)] = _table(device)[
            layer_code(layer_id, backward)
        ]
    index = call_index % TAG_LIMIT
    call = _CALLS.get((index, device))
    if call is None:
        if len(_CALLS) > 4 * _CALL_BLOCK:  # only the current steps' rows are needed
            _CALLS.clear()
        block = _table(device)[index : index + _CALL_BLOCK].unbind()
        _CALLS.update(((index + i, device), row) for i, row in enumerate(block))
        call = block[0]
    return call, code


def describe(layer_id: int, call_index: int, backward: bool, num_features: int) -> str:
    """What this rank was doing, for the mispairing error (the same words on every rank)."""
    if layer_id == 0:
        return f"{'backward' if backward else 'forward'} of a sync_batch_norm() call (C={num_features})"
    return (
        f"{'backward' if backward else 'forward'} of SyncBatchNorm layer #{layer_id} "
        f"(C={num_features}, synced call {call_index})"
    )


def tags_agree(reduced_tail: list[float], layer_id: int, call_index: int, backward: bool, world: int) -> bool:
    """True on every rank when all ranks sent this tail's tag, False on every rank otherwise."""
    b, a = call_index % TAG_LIMIT, layer_code(layer_id, backward)
    _, sb, sb2, sa, sa2 = reduced_tail
    return sb == world * b and sb2 == world * b * b and sa == world * a and sa2 == world * a * a


def raise_mispaired(
    description: str, process_group: comms.ProcessGroup, device: torch.device | None = None
) -> None:
    """Every rank learned at the same collective that the tags differ: name what each rank was doing.

    All ranks call this together (they read the same reduced tags), so the gather cannot pair with
    anything else; it is off the hot path.
    """
    seen = comms.gather_objects(description, process_group, device)
    groups: dict[str, list[int]] = {}
    for r, what in enumerate(seen):
        groups.setdefault(what, []).append(r)
    who = "; ".join(f"{_ranks(rs)}: {what}" for what, rs in groups.items())
    raise RuntimeError(
        f"SyncBatchNorm: calls mispaired across ranks in one all-reduce ({who}). Every rank must run each "
        "SyncBatchNorm layer in training mode equally often and in the same order, forward and backward; "
        "likely causes: a rank skipped a backward (e.g. a NaN-loss guard), ran a training-mode forward "
        "under torch.no_grad(), or skipped a layer. The statistics of this call were not used."
    )


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def check_fingerprint(
    parts: list[int], description: str, device: torch.device, process_group: comms.ProcessGroup
) -> None:
    """Debug mode: before a collective, all-reduce a fixed-size fingerprint of it (its kind and size, the
    layer, the call) so that calls whose payloads differ in size meet here and raise on every rank,
    where gloo would abort the process and NCCL would hang."""
    values = [p % TAG_LIMIT for p in parts]
    encoded = [float(x) for v in values for x in (v, v * v)]
    fingerprint = torch.tensor(encoded, dtype=torch.float64, device=device)
    reduced = comms.all_reduce_sum(fingerprint, process_group).tolist()
    world = comms.world_size(process_group)
    if any(reduced[2 * i] != world * v or reduced[2 * i + 1] != world * v * v for i, v in enumerate(values)):
        raise_mispaired(description, process_group, device)
