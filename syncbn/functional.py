"""sync_batch_norm(): batch normalization whose statistics are those of the global batch.

Forward packs ``[sum x (C), sum x^2 (C), count (1)]`` per rank into one float64 vector and all-reduces it;
backward all-reduces ``[sum dy (C), sum dy*(x-mean) (C)]``. One collective each way, count-weighted, so
uneven and empty per-rank batches are exact. See README "Exact semantics".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import comms

_native_bn_backward = torch.ops.aten.native_batch_norm_backward


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are float64 for float64 input and float32 otherwise (half inputs keep float32 stats)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def input_error(input: Tensor, num_features: int | None) -> str | None:
    """Why ``input`` cannot be batch-normalized over ``num_features`` channels, or None if it can."""
    if input.dim() < 2:
        return f"expected input (N, C, *) with at least 2 dims, got {input.dim()}D input {tuple(input.shape)}"
    if not input.is_floating_point():
        return f"expected a floating point input, got dtype {input.dtype} (shape {tuple(input.shape)})"
    if num_features is not None and input.shape[1] != num_features:
        return f"expected C={num_features} channels, got {input.shape[1]} (input shape {tuple(input.shape)})"
    return None


def _channel_view(v: Tensor, ndim: int) -> Tensor:
    # (C,) -> (1, C, 1, ..., 1) so it broadcasts against (N, C, *)
    return v.view((1, -1) + (1,) * (ndim - 2))


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _local_moments(x: Tensor, num_features: int) -> Tensor:
    """This rank's ``[sum x (C), sum x^2 (C), count (1)]`` as one float64 vector: the forward payload."""
    c, n = num_features, x.numel() // num_features
    if n == 0:  # an empty rank still joins the all-reduce, with zeros
        return torch.zeros(2 * c + 1, dtype=torch.float64, device=x.device)
    if x.is_cuda:
        # The native Welford kernel: stable local moments. With eps=0, var = invstd^-2, except that the
        # kernel reports invstd=0 (not inf) for a constant channel, whose variance is 0.
        mean, invstd = torch.batch_norm_stats(x, 0.0)
        moments = torch.stack([mean, invstd]).double()  # (2, C)
        inv = moments[1]
        moments[1] = torch.where(inv > 0, inv.pow(-2), torch.zeros_like(inv)) + moments[0] * moments[0]
        return torch.cat([moments.view(-1) * n, moments.new_full((1,), n)])
    # Sums about a per-channel shift (this rank's first value): x - shift is O(std), so float32 sums keep
    # their digits even when |mean| >> std, where E[x^2] - E[x]^2 in float32 loses all of them.
    dims = [0, *range(2, x.dim())]
    shift = x.as_strided((c,), (x.stride(1),), x.storage_offset())  # x[0, :, 0, ...] as one view op
    if shift.dtype != stats_dtype(x.dtype):
        shift = shift.to(stats_dtype(x.dtype))
    centred = x - _channel_view(shift, x.dim())  # (N, C, *), float32 even for half input
    local = torch.stack([centred.sum(dims), centred.square_().sum(dims)]).double()  # (2, C)
    # Back to moments about zero in float64: sum x = S' + n*k, sum x^2 = Q' + k*(S' + sum x).
    k = shift.double()
    total = torch.add(local[0], k, alpha=n)
    square = torch.addcmul(local[1], k, local[0] + total)
    return torch.cat([total, square, total.new_full((1,), n)])


def _global_count(packed: Tensor, error: str | None, group) -> int:
    """The global count, read once on the host; every rank reads the same number and takes the same branch."""
    count = packed[-1].item()  # the one host read per forward (a device sync on CUDA)
    if count != count:  # NaN: some rank flagged invalid input and joined only to tell us
        comms.raise_on_all_ranks(error, group)
    count = round(count)
    c = (packed.numel() - 1) // 2
    if count == 0:
        raise ValueError(
            f"SyncBatchNorm: the global batch is empty (0 values per channel across "
            f"{comms.world_size(group)} ranks); at least one rank must have a non-empty batch"
        )
    if count == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got a global batch of 1 value per "
            f"channel across {comms.world_size(group)} ranks (C={c})"
        )
    return count


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
        process_group,
    ) -> Tensor:
        # forward runs without autograd recording, so nothing here needs detach()
        error = input_error(input, num_features)
        if error is None:
            input = input.contiguous(memory_format=_memory_format(input))  # a no-op unless oddly strided
            packed = _local_moments(input, num_features)
        else:
            # Join the collective anyway with a NaN count, so the other ranks learn of the error instead
            # of waiting for us; then everyone raises together.
            packed = torch.zeros(2 * num_features + 1, dtype=torch.float64, device=input.device)
            packed[-1] = float("nan")
        # Collective 1 of 1 in forward: sums, squares and counts of every rank.
        comms.all_reduce_sum(packed, process_group)
        count = _global_count(packed, error, process_group)

        stats = packed[:-1].view(2, -1) / count  # float64 (2, C): E[x], E[x^2]
        mean, var = stats
        var.addcmul_(mean, mean, value=-1).clamp_min_(0)  # in place: stats is now (mean, biased var)
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)

        sdt = stats_dtype(input.dtype)
        mean_s, var_s = stats.to(sdt)
        w = weight if weight is None or weight.dtype == sdt else weight.to(sdt)
        b = bias if bias is None or bias.dtype == sdt else bias.to(sdt)
        if input.numel() == 0:
            out = torch.empty_like(input)
        elif input.is_cuda:
            out = torch.batch_norm_elemt(input, w, b, mean_s, (var_s + eps).rsqrt(), eps)
        else:
            # Eval-mode batch_norm with the global stats: one fused pass over the activation.
            out = torch.batch_norm(input, w, b, mean_s, var_s, False, 0.0, eps, False)

        ctx.save_for_backward(input, weight, mean_s, var_s)
        ctx.eps, ctx.count, ctx.process_group = eps, count, process_group
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    @once_differentiable  # no double backward: say so clearly instead of failing deep inside autograd
    def backward(ctx, grad_output: Tensor):
        input, weight, mean, var = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input = grad_weight = grad_bias = None
        grad_output = grad_output.contiguous(memory_format=_memory_format(input))
        invstd = (var + ctx.eps).rsqrt()

        if input.numel() == 0:
            sum_dy = torch.zeros_like(mean)
            sum_dy_xmu = torch.zeros_like(mean)
        elif input.is_cuda:
            # The kernels read weight in the statistics dtype; they may return defined weight/bias grads
            # even when not asked (channels_last template), so mask them below.
            w = weight if weight is None or weight.dtype == mean.dtype else weight.to(mean.dtype)
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
                grad_output, input, mean, invstd, w, True, need_weight, need_bias
            )
            grad_weight = grad_weight if need_weight else None
            grad_bias = grad_bias if need_bias else None
        else:
            # Train-mode native backward with invstd=1 returns exactly sum(dy*(x-mean)) and sum(dy) in one
            # fused pass over the activation (it subtracts the mean before multiplying: no cancellation).
            _, sum_dy_xmu, sum_dy = _native_bn_backward(
                grad_output,
                input,
                None,
                None,
                None,
                mean,
                torch.ones_like(mean),
                True,
                0.0,
                [False, True, True],
            )
        if input.numel() == 0 or not input.is_cuda:
            # needs_input_grad is False for a None weight/bias, so these stay None when there is none.
            grad_weight = sum_dy_xmu * invstd if need_weight else None  # local: DDP averages it
            grad_bias = sum_dy if need_bias else None

        # Collective 1 of 1 in backward: the two per-channel sums the input gradient needs. Every rank
        # that runs backward joins, even one whose input needs no gradient (torch skips it there): a
        # rank-local decision could leave the other ranks waiting in this all-reduce forever.
        packed = torch.cat([sum_dy, sum_dy_xmu]).double()
        comms.all_reduce_sum(packed, ctx.process_group)
        if need_input:
            sums = packed.view(2, -1).to(mean.dtype)  # global sum dy, sum dy*(x - mean)
            grad_input = _input_grad(grad_output, input, weight, mean, var, invstd, sums, ctx.count, ctx.eps)

        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def _input_grad(dy, x, weight, mean, var, invstd, sums, count, eps) -> Tensor:
    """dx = (dy - sum_dy/N - (x - mean) * invstd^2 * sum_dy_xmu/N) * invstd * weight."""
    if x.numel() == 0:
        return torch.zeros_like(x)
    w = weight if weight is None or weight.dtype == mean.dtype else weight.to(mean.dtype)
    if x.is_cuda:
        # The native kernel takes the global sums and divides by the total of the per-rank counts it is
        # given (int32); it reads weight in the statistics dtype. torch.full fills on the device: no sync.
        counts = torch.full((1,), count, dtype=torch.int32, device=x.device)
        return torch.batch_norm_backward_elemt(dy, x, mean, invstd, w, sums[0], sums[1], counts)
    a = invstd if w is None else invstd * w
    mean_dy, mean_dy_xmu = sums / count
    # dx = a*dy + b*(x - mean) + c, per channel. The b and c part is one eval-mode batch_norm pass
    # (weight b/invstd, bias c), then a*dy is added in place: two passes, no extra activation-sized temp.
    dx = torch.batch_norm(x, -a * invstd * mean_dy_xmu, -a * mean_dy, mean, var, False, 0.0, eps, False)
    # Same-dtype addcmul: a float32 factor on a half tensor takes a slow, unvectorized mixed-type path.
    return dx.addcmul_(dy, _channel_view(a.to(dx.dtype), x.dim()))


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
        return _local_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    known = _known_channels(weight, running_mean)
    error = input_error(input, known)
    num_features = known if known is not None else (input.shape[1] if error is None else -1)
    group = comms.private_group(process_group)
    comms.check_num_features(num_features, input.device, group, error)
    return _apply(input, weight, bias, running_mean, running_var, eps, momentum, num_features, group)


def _apply(
    input, weight, bias, running_mean, running_var, eps, momentum, num_features, process_group
) -> Tensor:
    args = (input, weight, bias, running_mean, running_var, eps, momentum, num_features, process_group)
    if torch.is_autocast_enabled(input.device.type):
        # autocast would recast our float32 statistics; the function picks its own dtypes.
        with torch.autocast(device_type=input.device.type, enabled=False):
            return SyncBatchNormFunction.apply(*args)
    return SyncBatchNormFunction.apply(*args)


def _known_channels(weight: Tensor | None, running_mean: Tensor | None) -> int | None:
    """The channel count the caller's parameters or buffers imply, if any."""
    return next((t.numel() for t in (weight, running_mean) if t is not None), None)


def _local_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) -> Tensor:
    error = input_error(input, _known_channels(weight, running_mean))
    if error is not None:
        raise ValueError(f"SyncBatchNorm: {error}")
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
