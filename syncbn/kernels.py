"""The per-rank arithmetic of SyncBatchNorm around its two all-reduces, on CPU and on CUDA.

Few and large ATen calls: at small batches a layer step costs what it dispatches, so every constant
(payload buffer, its views) is built once per layer and reused (the tag rows once per device: pairing).
Every function here is plain tensors in, tensors out; the collectives and checks live in
:mod:`syncbn.functional`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import pairing

_native_bn_backward = torch.ops.aten.native_batch_norm_backward

# From this size (elements) on, passes over the activation cost more than dispatches (measured on CPU).
LARGE = 1 << 16
# CUDA's native input-gradient kernel takes the global count as int32: past this, the generic path.
INT32_MAX = (1 << 31) - 1


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are float64 for float64 input and float32 otherwise (half inputs keep float32 stats)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Pair(NamedTuple):
    """Both payloads' data rows of a two-rank exchange, in rank order (every rank combines them in the same
    order: identical bits), and rank 1's share of the global count. Combined by the next op that needs them
    (one fused dispatch), where an all-reduce would have summed them first."""

    rank0: Tensor
    rank1: Tensor
    share1: float


class Workspace:
    """One layer's float64 payload ``[data (2, C) | count | b, b^2 | a, a^2]``, fixed views of it, and an
    inbox of the same shape for a peer's payload (two-rank exchange).

    Forward and backward payloads of a layer have the same length, so a rank that skipped a backward
    meets a same-size payload and the tag (not gloo) reports it. Reused across calls: everything a call
    keeps (saved stats, output, grads) is a fresh tensor, never a view of this buffer. Calls of one layer
    run one after another; two threads must not run the same layer at once.
    """

    def __init__(self, num_features: int, device: torch.device) -> None:
        c = num_features
        self.payload = torch.zeros(2 * c + pairing.TAIL, dtype=torch.float64, device=device)
        self.data = self.payload[: 2 * c].view(2, c)  # forward: sum x, sum x^2; backward: sum dy, sum dy*xhat
        self.first, self.second = self.data.unbind()
        self.scaled = self.payload[: 2 * c + 1]  # the data and the count slot
        self.tail = self.payload[2 * c :]
        self.count_slot = self.payload[2 * c : 2 * c + 1]
        self.tag_slots = self.payload[2 * c + 1 :]
        self._host_tail = _host_view(self.tail)
        self.inbox = torch.zeros_like(self.payload)
        self.inbox_data = self.inbox[: 2 * c].view(2, c)
        self.inbox_tail = self.inbox[2 * c :]
        self._host_inbox_tail = _host_view(self.inbox_tail)
        self._host_data = (_host_view(self.data), _host_view(self.inbox_data))
        self._counts: dict[float, Tensor] = {}
        self._shaped: dict[int, tuple[Tensor, Tensor]] = {}
        self._ones: dict[torch.dtype, Tensor] = {}
        self._counter_one: Tensor | None = None
        self._scratch: dict[torch.dtype, tuple[Tensor, Tensor, Tensor]] = {}

    def rows_as(self, ndim: int) -> tuple[Tensor, Tensor]:
        """Both data rows viewed as (1, C, 1, ...), to combine with per-channel views of (N, C, *) input."""
        views = self._shaped.get(ndim)
        if views is None:
            shape = (1, -1) + (1,) * (ndim - 2)
            views = self._shaped[ndim] = (self.first.view(shape), self.second.view(shape))
        return views

    def read_tail(self) -> list[float]:
        """The payload tail on the host: the one device sync of a pass on CUDA, no dispatch on CPU."""
        return self._host_tail.tolist() if self._host_tail is not None else self.tail.tolist()

    def read_inbox_tail(self) -> list[float]:
        """The tail of the peer's payload (two-rank exchange, CPU)."""
        tail = self._host_inbox_tail
        return tail.tolist() if tail is not None else self.inbox_tail.tolist()

    def swapped_data_finite(self) -> bool:
        """Whether both ranks' data rows of a two-rank swap are finite (a host read on CPU: no dispatch)."""
        mine, theirs = self._host_data
        if mine is None or theirs is None:
            return bool(torch.isfinite(self.data).all() and torch.isfinite(self.inbox_data).all())
        return math.isfinite(mine.sum()) and math.isfinite(theirs.sum())  # an overflow is a false alarm only

    def moments_centred(self) -> bool:
        """Whether the packed (mean, var) rows have |mean| <= 10 std on every channel: where a one-pass
        kernel loses no more digits than moments about a shift would (a host read on CPU: no dispatch).
        NaN compares false, so a NaN input keeps its NaN statistics, as BatchNorm does."""
        rows = self._host_data[0]
        mean, var = rows if rows is not None else (self.first, self.second)
        return not bool((mean * mean > 100.0 * var).any())

    def count(self, n: float) -> Tensor:
        """``[n]`` (float64) for the count slot: cached, since a layer sees few batch sizes."""
        t = self._counts.get(n)
        if t is None:
            if len(self._counts) > 64:
                self._counts.clear()
            t = self._counts[n] = torch.full((1,), n, dtype=torch.float64, device=self.payload.device)
        return t

    def ones(self, dtype: torch.dtype) -> Tensor:
        ones = self._ones.get(dtype)
        if ones is None:
            ones = self._ones[dtype] = torch.ones_like(self.first, dtype=dtype)
        return ones

    def ones_like_counter(self, counter: Tensor) -> Tensor:
        """A 0-dim 1 in the dtype of a ``num_batches_tracked`` counter."""
        one = self._counter_one
        if one is None or one.dtype != counter.dtype:
            one = self._counter_one = torch.ones_like(counter)
        return one

    def scratch(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """A (2, C) buffer and its two rows, for values used within one call only."""
        entry = self._scratch.get(dtype)
        if entry is None:
            buf = torch.zeros_like(self.data, dtype=dtype)
            entry = self._scratch[dtype] = (buf, *buf.unbind())
        return entry


def _host_view(t: Tensor):
    # A numpy view of a CPU tensor reads without an ATen dispatch (two per read with tolist()).
    if t.device.type != "cpu":
        return None
    try:
        return t.numpy()
    except (ImportError, RuntimeError):  # numpy is optional for torch
        return None


_WORKSPACES: dict = {}


def workspace(layer_id: int, num_features: int, device: torch.device) -> Workspace:
    key = (layer_id, num_features, device)
    ws = _WORKSPACES.get(key)
    if ws is None:
        if len(_WORKSPACES) > 4096:  # layers come and go (tests, notebooks): keep the cache bounded
            _WORKSPACES.clear()
        ws = _WORKSPACES[key] = Workspace(num_features, device)
    return ws


def _shift_view(x: Tensor) -> Tensor:
    # x[0, :, 0, ...] as a (1, C, 1, ...) view in one op: a per-channel sample of this rank's data
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    return x.as_strided(shape, (0, x.stride(1)) + (0,) * (x.dim() - 2), x.storage_offset())


def pack_moments(x: Tensor, ws: Workspace, call_row: Tensor, code_row: Tensor, *, sums: bool = True) -> None:
    """Write this rank's forward payload ``[sum x, sum x^2, n | tag]`` (float64) into ``ws.payload``; with
    ``sums=False`` the data rows are the means ``[E x, E x^2]`` instead (a two-rank exchange weights them).

    CPU: one pass over the input itself while every channel has |mean| <= 10 std; past that, moments about
    a shift (this rank's first value per channel, so |mean| >> std costs no digits), moved back about zero
    in float64. CUDA: the native Welford kernel. ``x`` is non-empty and valid.
    """
    n = x.numel() // x.shape[1]
    if x.is_cuda:
        mean, invstd = torch.batch_norm_stats(x, 0.0)
        # With eps=0, var = invstd^-2, except that the kernel reports invstd=0 (not inf) for a constant
        # channel, whose variance is 0.
        moments = mean, torch.where(invstd > 0, invstd.pow(-2), torch.zeros_like(invstd))
    elif x.numel() >= LARGE and x.dim() > 2 and x.is_contiguous() and not _is_half(x):
        # batch_norm_update_stats accumulates NCHW float32 in float64, unvectorized: plain sums are faster
        _pack_shifted_sums(x, ws, call_row, code_row)
        if not sums:
            ws.data.div_(n)
        return
    else:
        moments = _unshifted_moments(x, ws)
    if moments is not None:
        torch.cat([*moments, ws.count(n), call_row, code_row], out=ws.payload)
    if not x.is_cuda and (moments is None or not ws.moments_centred()):
        _pack_shifted_moments(x, ws, call_row, code_row, n)  # some channel has |mean| > 10 std
    ws.second.addcmul_(ws.first, ws.first)  # E[x^2] = var + mean^2, in float64
    if sums:
        ws.data.mul_(n)  # [n mean, n E[x^2]]


def _is_half(x: Tensor) -> bool:
    return x.dtype in (torch.bfloat16, torch.float16)


def _unshifted_moments(x: Tensor, ws: Workspace) -> tuple[Tensor, Tensor] | None:
    """(mean, biased var) in one pass over ``x`` itself, or None where this torch has no such pass for its
    dtype. Close to float64 while every channel has |mean| <= 10 std (the caller checks); saves the shifted
    copy of the input and the dispatches that make it (three per small step)."""
    if _is_half(x):
        # Given float32 running stats, the kernel takes its mixed-type path: it accumulates the half input
        # in float32 and returns float32 (mean, biased var). The stats are dummies: momentum 0 keeps them.
        _, running_mean, running_var = ws.scratch(torch.float32)
        mean, var = torch.batch_norm_update_stats(x, running_mean, running_var, 0.0)
        if mean.dtype != torch.float32:  # a torch without that path: half stats would lose digits
            return None
        return mean, var
    if x.dtype in (torch.float32, torch.float64):
        return torch.batch_norm_update_stats(x, None, None, 0.0)
    return None


def _pack_shifted_moments(x: Tensor, ws: Workspace, call_row: Tensor, code_row: Tensor, n: int) -> None:
    """(mean, biased var) about a shift, this rank's first value per channel: O(std) values, whatever the
    mean; the mean moved back about zero in float64."""
    shift = _shift_view(x)
    # (N, C, *), O(std) values; float32 for half input, where x - shift is exact
    centred = x - (shift if x.dtype in (torch.float32, torch.float64) else shift.float())
    mean, var = torch.batch_norm_update_stats(centred, None, None, 0.0)
    torch.cat([mean, var, ws.count(n), call_row, code_row], out=ws.payload)
    ws.rows_as(x.dim())[0].add_(shift)  # float64 mean = shift + mean about the shift


def _pack_shifted_sums(x: Tensor, ws: Workspace, call_row: Tensor, code_row: Tensor) -> None:
    n, dims = x.numel() // x.shape[1], [0, *range(2, x.dim())]
    shift = _shift_view(x)
    # (N, C, *), O(std) values; float32 for half input, where x - shift is exact
    centred = x - (shift if x.dtype in (torch.float32, torch.float64) else shift.float())
    sums = centred.sum(dims)  # about the shift, O(std) terms: float32 sums keep their digits
    torch.cat([sums, centred.square_().sum(dims), ws.count(n), call_row, code_row], out=ws.payload)
    # Back to moments about zero in float64: sum x^2 = Q' + 2k S' + n k^2, sum x = S' + n k.
    total, square = ws.rows_as(centred.dim())
    square.addcmul_(total, shift, value=2).addcmul_(shift, shift, value=n)
    total.add_(shift, alpha=n)


def pack_empty(ws: Workspace, call_row: Tensor, code_row: Tensor, count: float) -> None:
    """A payload with zero data: an empty rank (count 0) or a rank with bad input (count NaN)."""
    torch.cat([call_row, code_row], out=ws.tag_slots)
    ws.scaled.fill_(0.0)
    ws.count_slot.fill_(count)


def global_stats(
    ws: Workspace, count: float, dtype: torch.dtype, pair: Pair | None = None
) -> tuple[Tensor, Tensor]:
    """(mean, biased var) of the global batch, as fresh ``dtype`` tensors: from the reduced forward payload
    (sums), or from a two-rank exchange's ``pair`` of means, weighted by count in one op."""
    if pair is None:
        ws.data.div_(count)  # E[x], E[x^2]
    elif ws.swapped_data_finite():  # rank 0's + n1 / N (rank 1's - rank 0's): the count-weighted mean
        torch.lerp(pair.rank0, pair.rank1, pair.share1, out=ws.data)
    else:  # lerp turns an inf into NaN (inf - inf); a weighted sum propagates it as BatchNorm does
        ws.data.copy_(pair.rank0 * (1.0 - pair.share1) + pair.rank1 * pair.share1)
    # float64 cancellation costs ~1e-16 (mean/std)^2 of the variance; clamp the rounding below zero.
    ws.second.addcmul_(ws.first, ws.first, value=-1).clamp_min_(0.0)
    mean, var = ws.data.to(dtype, copy=True).unbind()
    return mean, var


def update_running(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    mean: Tensor,
    var: Tensor,
    ws: Workspace,
    *,
    momentum: float,
    count: float,
    num_batches_tracked: Tensor | None = None,
) -> None:
    """Exponential (or cumulative) update with the global mean and the unbiased global variance; adds 1 to
    ``num_batches_tracked`` when given (in the same dispatch)."""
    unbias = count / (count - 1)
    if (
        running_mean is not None
        and running_var is not None
        and running_mean.dtype == running_var.dtype == mean.dtype
    ):
        # Both buffers in two dispatches: r = (1 - momentum) r + momentum * stat
        torch._foreach_mul_([running_mean, running_var], 1.0 - momentum)
        ones = ws.ones(mean.dtype)
        buffers, stats, factors = [running_mean, running_var], [mean, var], [ones, ones]
        scalars = [momentum, momentum * unbias]
        if num_batches_tracked is not None:  # the batch counter rides along: + 1 * 1 * 1
            one = ws.ones_like_counter(num_batches_tracked)
            buffers.append(num_batches_tracked)
            stats.append(one)
            factors.append(one)
            scalars.append(1)
        torch._foreach_addcmul_(buffers, stats, factors, scalars)
        return
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is not None:
        running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
    if running_var is not None:
        running_var.mul_(1.0 - momentum).add_(var, alpha=momentum * unbias)


def normalize(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor, *, eps: float
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` in one fused pass (weight/bias in the stats dtype)."""
    if x.numel() == 0:
        return torch.empty_like(x)
    if x.is_cuda:
        return torch.batch_norm_elemt(x, weight, bias, mean, (var + eps).rsqrt(), eps)
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)


def reduce_grads(
    dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, var: Tensor, *, eps: float
) -> tuple[Tensor, Tensor]:
    """This rank's ``(sum dy * xhat, sum dy)`` per channel (= its local weight and bias gradients).

    CPU: eval-mode native backward, whose weight/bias grads are exactly these sums (one fused pass).
    CUDA: ``batch_norm_backward_reduce`` gives ``sum dy * (x - mean)``; scaled by invstd here.
    """
    if x.numel() == 0:
        return torch.zeros_like(mean), torch.zeros_like(mean)
    if x.is_cuda:
        invstd = (var + eps).rsqrt()
        sum_dy, sum_dy_xmu, _, _ = torch.batch_norm_backward_reduce(
            dy, x, mean, invstd, weight, True, False, False
        )
        return sum_dy_xmu * invstd, sum_dy
    _, sum_dy_xhat, sum_dy = _native_bn_backward(
        dy, x, weight, mean, var, None, None, False, eps, [False, True, True]
    )
    return sum_dy_xhat, sum_dy


def input_grad(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    var: Tensor,
    ws: Workspace,
    *,
    count: float,
    eps: float,
    pair: Pair | None = None,
) -> Tensor:
    """dx = weight * invstd * (dy - sum dy / N - xhat * sum(dy * xhat) / N), from the reduced payload or
    from a two-rank exchange's ``pair`` of payloads (summed here, in the op that needs the sums)."""
    if x.numel() == 0:
        return torch.zeros_like(x)
    small = x.numel() < LARGE and not x.is_cuda
    if pair is not None and not small:
        torch.add(pair.rank0, pair.rank1, out=ws.data)
    if x.is_cuda and count <= INT32_MAX:
        # The native kernel divides by the total of the per-rank counts it is given (int32) and wants
        # sum dy * (x - mean); torch.full fills on the device: no sync. A larger count (a 3-D batch on
        # many GPUs) takes the few-pass path below, which works on any device.
        invstd = (var + eps).rsqrt()
        sum_dy, sum_dy_xhat = ws.data.to(mean.dtype).unbind()
        counts = torch.full((1,), count, dtype=torch.int32, device=x.device)
        return torch.batch_norm_backward_elemt(
            dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat / invstd, counts
        )
    coef, bias_row, weight_row = ws.scratch(mean.dtype)
    if small:
        # Fewest dispatches: the sums in the stats dtype; batch_norm with weight sum(dy xhat) and bias
        # sum(dy) gives N times the two correction terms; dy - that / N; then eval-mode native backward
        # multiplies by invstd * weight.
        if pair is None:
            coef.copy_(ws.data)
        else:
            torch.add(pair.rank0, pair.rank1, out=coef)
        inner = torch.batch_norm(x, weight_row, bias_row, mean, var, False, 0.0, eps, False)
        inner = torch.add(dy, inner, alpha=-1.0 / count)
        mask = [True, False, False]
        return _native_bn_backward(inner, x, weight, mean, var, None, None, False, eps, mask)[0]
    # Fewest passes: a = weight * invstd; batch_norm(x, -a mean(dy xhat), -a mean(dy)) + a * dy.
    a = (var + eps).rsqrt_()
    if weight is not None:
        a.mul_(weight)
    torch.mul(ws.data, a * (-1.0 / count), out=coef)
    dx = torch.batch_norm(x, weight_row, bias_row, mean, var, False, 0.0, eps, False)
    # Same-dtype addcmul: a float32 factor on a half tensor takes a slow, unvectorized mixed-type path.
    a = a if a.dtype == dx.dtype else a.to(dx.dtype)
    return dx.addcmul_(dy, a.view((1, -1) + (1,) * (x.dim() - 2)))
