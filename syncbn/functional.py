"""sync_batch_norm(): batch normalization whose statistics are those of the global batch.

Forward all-reduces one float64 vector ``[sum x (C), sum x^2 (C), count | call tag]`` per layer call;
backward all-reduces ``[sum dy (C), sum dy*xhat (C), 1 | call tag]``, the same length. One collective each
way, count-weighted (uneven and empty per-rank batches are exact), and a tag that turns calls mispaired
across ranks into an error on every rank. See README "Exact semantics".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import comms, kernels, pairing
from .kernels import stats_dtype

__all__ = [
    "backward_reduce_and_grad",
    "forward_stats_and_normalize",
    "input_error",
    "sync_batch_norm",
]


def input_error(input: Tensor, num_features: int | None) -> str | None:
    """Why ``input`` cannot be batch-normalized over ``num_features`` channels, or None if it can."""
    if input.dim() < 2:
        return f"expected input (N, C, *) with at least 2 dims, got {input.dim()}D input {tuple(input.shape)}"
    if not input.is_floating_point():
        return f"expected a floating point input, got dtype {input.dtype} (shape {tuple(input.shape)})"
    if num_features is not None and input.shape[1] != num_features:
        return f"expected C={num_features} channels, got {input.shape[1]} (input shape {tuple(input.shape)})"
    return None


def memory_format(x: Tensor) -> torch.memory_format:
    """The layout the kernels run in: channels_last(_3d) when ``x`` is in it, else contiguous."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _in_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _exchange(
    ws: kernels.Workspace,
    layer_id: int,
    call_index: int,
    backward: bool,
    num_features: int,
    group,
    swap: bool,
) -> tuple[list[float], kernels.Pair | None]:
    """All-reduce the layer's payload (or ``swap`` it, on a two-rank CPU group: comms.pairs); return the
    summed tail once the call tags agree on every rank, and the two ranks' data rows when swapped."""
    if comms.debug():
        size = ws.payload.numel()
        parts = [1, size, size >> 16, pairing.layer_code(layer_id, backward), call_index]
        what = pairing.describe(layer_id, call_index, backward, num_features)
        pairing.check_fingerprint(parts, what, ws.payload.device, group)
    # The one collective of this pass: statistics (or gradient sums), count and tag of every rank.
    pair = None
    if swap:
        me = comms.swap(ws.payload, ws.inbox, group)
        mine, theirs = ws.read_tail(), ws.read_inbox_tail()  # no dispatch: host views
        tail = [a + b for a, b in zip(mine, theirs, strict=True)]  # whole numbers: exact, as a sum would be
        rows = (ws.data, ws.inbox_data) if me == 0 else (ws.inbox_data, ws.data)
        share1 = (theirs if me == 0 else mine)[0] / tail[0] if tail[0] else 0.0
        pair = kernels.Pair(*rows, share1)
    else:
        comms.all_reduce_sum(ws.payload, group)
        tail = ws.read_tail()  # the one host read of this pass (a device sync on CUDA)
    if not pairing.tags_agree(tail, layer_id, call_index, backward, comms.world_size(group)):
        what = pairing.describe(layer_id, call_index, backward, num_features)
        pairing.raise_mispaired(what, group, ws.payload.device)
    return tail, pair


def _checked_count(count: float, error: str | None, num_features: int, group, device: torch.device) -> float:
    """The global count; every rank reads the same number, so every rank takes the same branch."""
    if count != count:  # NaN: some rank flagged invalid input and joined only to tell us
        comms.raise_on_all_ranks(error, group, device)
    if count == 0:
        raise ValueError(
            f"SyncBatchNorm: the global batch is empty (0 values per channel across "
            f"{comms.world_size(group)} ranks); at least one rank must have a non-empty batch"
        )
    if count == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got a global batch of 1 value per "
            f"channel across {comms.world_size(group)} ranks (C={num_features})"
        )
    return count


def forward_stats_and_normalize(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    eps: float,
    momentum: float,
    num_features: int,
    layer_id: int,
    call_index: int,
    process_group: comms.ProcessGroup,
    num_batches_tracked: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """Global statistics (one all-reduce), running-stat update (and ``num_batches_tracked`` + 1, when
    given) and normalization: the synced forward of eager and compiled calls alike.

    Returns ``(input as used, output, mean, var, count)``: the input in the layout the kernels ran in (what
    backward must save), mean and biased variance of the global batch in the stats dtype and the global
    count per channel. A rank whose input is invalid still joins the collective, with a NaN count, so
    every rank raises together.
    """
    error = input_error(input, num_features)
    if error is None:
        input = input.contiguous(memory_format=memory_format(input))  # a no-op unless oddly strided
    ws = kernels.workspace(layer_id, num_features, input.device)
    call_row, code_row = pairing.tail_parts(layer_id, call_index, False, input.device)
    # A two-rank swap sends means, which the combine weights by count; an all-reduce sums sums.
    swap = comms.pairs(process_group, input.device)
    if error is None and input.numel() > 0:
        try:
            kernels.pack_moments(input, ws, call_row, code_row, sums=not swap)
        except RuntimeError as e:  # still join the collective, so the others raise instead of waiting
            error = f"{type(e).__name__}: {e}"
    if error is not None or input.numel() == 0:
        kernels.pack_empty(ws, call_row, code_row, 0.0 if error is None else float("nan"))
    tail, pair = _exchange(ws, layer_id, call_index, False, num_features, process_group, swap)
    count = _checked_count(tail[0], error, num_features, process_group, input.device)

    sdt = stats_dtype(input.dtype)
    mean, var = kernels.global_stats(ws, count, sdt, pair)
    kernels.update_running(
        running_mean,
        running_var,
        mean,
        var,
        ws,
        momentum=momentum,
        count=count,
        num_batches_tracked=num_batches_tracked,
    )
    out = kernels.normalize(input, _in_dtype(weight, sdt), _in_dtype(bias, sdt), mean, var, eps=eps)
    return input, out, mean, var, count


def backward_reduce_and_grad(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    *,
    eps: float,
    count: float,
    num_features: int,
    layer_id: int,
    call_index: int,
    process_group: comms.ProcessGroup,
    need_input: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """Input gradient (one all-reduce) and this rank's local weight/bias gradients, in the stats dtype.

    Every rank that runs backward joins the collective, even one whose input needs no gradient: a
    rank-local decision could leave the other ranks waiting in this all-reduce forever. On CUDA the tag
    check reads 5 numbers back to the host: one device sync per layer backward, the price of raising on
    every rank instead of computing with another rank's sums.
    """
    ws = kernels.workspace(layer_id, num_features, input.device)
    w = _in_dtype(weight, mean.dtype)
    call_row, code_row = pairing.tail_parts(layer_id, call_index, True, input.device)
    error = None
    try:
        grad_weight, grad_bias = kernels.reduce_grads(grad_output, input, w, mean, var, eps=eps)
        torch.cat([grad_bias, grad_weight, ws.count(1.0), call_row, code_row], out=ws.payload)
    except RuntimeError as e:  # join anyway with a NaN in the count slot, so every rank raises
        error = f"{type(e).__name__}: {e}"
        kernels.pack_empty(ws, call_row, code_row, float("nan"))
    swap = comms.pairs(process_group, input.device)
    reduced, pair = _exchange(ws, layer_id, call_index, True, num_features, process_group, swap)
    if reduced[0] != reduced[0]:  # NaN: some rank failed here and joined only to tell us
        comms.raise_on_all_ranks(error, process_group, input.device)
    grad_input = None
    if need_input:
        grad_input = kernels.input_grad(grad_output, input, w, mean, var, ws, count=count, eps=eps, pair=pair)
    return grad_input, grad_weight, grad_bias


class SyncBatchNormFunction(torch.autograd.Function):
    """Autograd function behind :func:`sync_batch_norm` (training mode, world size > 1)."""

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        momentum: float,
        num_features: int,
        layer_id: int,
        call_index: int,
        process_group,
        num_batches_tracked: Tensor | None,
    ) -> Tensor:
        # forward runs without autograd recording, so nothing here needs detach()
        input, out, mean, var, count = forward_stats_and_normalize(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            eps=eps,
            momentum=momentum,
            num_features=num_features,
            layer_id=layer_id,
            call_index=call_index,
            process_group=process_group,
            num_batches_tracked=num_batches_tracked,
        )
        ctx.save_for_backward(input, weight, mean, var)
        ctx.args = (eps, count, num_features, layer_id, call_index, process_group)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    @once_differentiable  # no double backward: say so clearly instead of failing deep inside autograd
    def backward(ctx, grad_output: Tensor):
        input, weight, mean, var = ctx.saved_tensors
        eps, count, num_features, layer_id, call_index, group = ctx.args
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input, grad_weight, grad_bias = backward_reduce_and_grad(
            grad_output.contiguous(memory_format=memory_format(input)),
            input,
            weight,
            mean,
            var,
            eps=eps,
            count=count,
            num_features=num_features,
            layer_id=layer_id,
            call_index=call_index,
            process_group=group,
            need_input=need_input,
        )
        # needs_input_grad is False for a None weight/bias, so these stay None when there is none;
        # weight/bias grads stay local: DDP averages them.
        grad_weight = _in_dtype(grad_weight, weight.dtype) if need_weight else None
        grad_bias = _in_dtype(grad_bias, ctx.bias_dtype) if need_bias else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


def sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group=None,
) -> Tensor:
    """Like ``F.batch_norm``, but in training the statistics are those of the whole process group.

    Falls back to ``F.batch_norm`` (no collective) when not training or when the group has one rank.
    Unlike the :class:`SyncBatchNorm` module, which checks once, every call first checks with a tiny
    collective that all ranks agree on the channel count (a mismatch would otherwise abort gloo).
    """
    if not training or comms.world_size(process_group) == 1:
        return _local_batch_norm(
            input, running_mean, running_var, weight, bias, training=training, momentum=momentum, eps=eps
        )
    known = _known_channels(weight, running_mean)
    error = input_error(input, known)
    num_features = known if known is not None else (input.shape[1] if error is None else -1)
    if torch.compiler.is_compiling():  # the ops of syncbn.compiled, channel check included
        from .compiled import functional_batch_norm

        return functional_batch_norm(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            momentum=momentum,
            eps=eps,
            num_features=num_features,
            process_group=process_group,
        )
    group = comms.private_group(process_group)
    check_channels(num_features, input.device, group, error, layer_id=0, call_index=0)
    return _apply(
        input,
        weight,
        bias,
        running_mean,
        running_var,
        eps=eps,
        momentum=momentum,
        num_features=num_features,
        process_group=group,
    )


def check_channels(
    num_features: int,
    device: torch.device,
    group: comms.ProcessGroup,
    error: str | None,
    *,
    layer_id: int,
    call_index: int,
) -> None:
    """The fixed-size check that every rank syncs the same channel count (see comms): before a layer's first
    synced call, and before every ``sync_batch_norm()`` call."""
    if comms.debug():
        parts = [0, comms.world_size(group), 0, pairing.layer_code(layer_id, False), call_index]
        what = "channel check before the " + pairing.describe(layer_id, call_index, False, num_features)
        pairing.check_fingerprint(parts, what, device, group)
    comms.check_num_features(num_features, device, group, error)


def _apply(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    eps: float,
    momentum: float,
    num_features: int,
    process_group: comms.ProcessGroup,
    layer_id: int = 0,
    call_index: int = 0,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """The synced path: ``SyncBatchNormFunction`` with autocast off (it picks its own dtypes)."""
    args = (input, weight, bias, running_mean, running_var, eps, momentum, num_features, layer_id, call_index)
    if torch.is_autocast_enabled(input.device.type):
        with torch.autocast(device_type=input.device.type, enabled=False):
            return SyncBatchNormFunction.apply(*args, process_group, num_batches_tracked)
    return SyncBatchNormFunction.apply(*args, process_group, num_batches_tracked)


def momentum_factor(momentum: float | None, num_batches_tracked: Tensor | None, pending: int = 0) -> float:
    """The running-stat factor of this call, as torch's _BatchNorm has it: ``momentum``, or
    1 / num_batches_tracked (cumulative average) for ``momentum=None`` while tracking (0.0 otherwise).
    ``pending``: batches counted but not yet added to the counter."""
    if momentum is not None:
        return momentum
    return 0.0 if num_batches_tracked is None else 1.0 / (float(num_batches_tracked) + pending)


def _known_channels(weight: Tensor | None, running_mean: Tensor | None) -> int | None:
    """The channel count the caller's parameters or buffers imply, if any."""
    return next((t.numel() for t in (weight, running_mean) if t is not None), None)


def _local_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """Plain ``F.batch_norm`` (no collective), after the same input checks as the synced path."""
    error = input_error(input, _known_channels(weight, running_mean))
    if error is not None:
        raise ValueError(f"SyncBatchNorm: {error}")
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
