"""torch.compile support: a SyncBatchNorm training step as opaque custom ops, one all-reduce each way.

Under ``torch.compile`` the layer calls ``syncbn::forward`` (stats, all-reduce, normalize) and
``syncbn::update_running_stats``; autograd calls ``syncbn::backward`` (grad sums, all-reduce, input grad).
Dynamo sees ops with fake kernels, so ``fullgraph=True`` holds and each collective stays inside one op.
Chosen over functional collectives in a traced Function because every cross-rank decision (call tags
agree, global count 0 or 1, a rank's bad input) reads the reduced payload on the host: traced, each would
be a graph break or a dropped check. The ops run the eager kernels, so aot_eager equals eager bit for bit;
the price is that Inductor fuses nothing into the layer's own passes (each is one fused kernel already).

Two things the eager path gets for free are made explicit here. Order: ranks whose batch sizes differ
compile different graphs, and Inductor may schedule independent ops (a ResNet shortcut's BN and the main
branch's) differently in each, which would pair one rank's all-reduce with another layer's. So every op
consumes a value the previous synced op produced: the forward ops through ``_ORDER`` (read by
``forward``, written by ``update_running_stats``), the backward ops through a token each returns for the
next one traced. State: the call counter, first-call check and process group stay on the module, found by
a rank-local key, so eager and compiled calls of one layer share them and their call tags agree.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from . import comms, kernels
from .functional import (
    backward_reduce_and_grad,
    check_channels,
    forward_stats_and_normalize,
    input_error,
    memory_format,
    momentum_factor,
)
from .kernels import stats_dtype

__all__ = ["backward_op", "forward_op", "register", "sync_batch_norm", "update_running_stats_op"]

_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # key -> SyncBatchNorm
_KEYS = itertools.count(1)
# Read by every compiled forward op and written by the update op after it: a data dependency chain.
_ORDER = torch.zeros((), dtype=torch.int64)
# (trace, token) of the backward op traced last: the next backward op traced in that trace consumes it.
_LAST_BACKWARD: list = [None, None]


def register(layer: torch.nn.Module) -> int:
    """A key by which the compiled ops find ``layer`` (rank-local: it never enters a payload)."""
    key = next(_KEYS)
    _LAYERS[key] = layer
    return key


def _layer(key: int) -> Any:
    layer = _LAYERS.get(key)
    if layer is None:
        raise RuntimeError(f"SyncBatchNorm: the layer (key {key}) of this compiled call no longer exists")
    return layer


@dataclass
class _FunctionalState:
    group: comms.ProcessGroup
    layer_id: int = 0  # the call tag of sync_batch_norm() calls: layer 0, call 0


class _FunctionalCalls:
    """What the ops need of a layer, for ``sync_batch_norm()`` calls on one process group: the eager
    functional form's call tag (layer 0, call 0) and its channel check before every call."""

    def __init__(self, group_name: str) -> None:
        self.group_name = group_name

    def _current_sync_state(self) -> _FunctionalState:
        return _FunctionalState(comms.private_group(comms.group_by_name(self.group_name)))

    def begin_call(self, state: _FunctionalState, input: Tensor, num_features: int) -> int:
        error = input_error(input, num_features if num_features >= 0 else None)
        check_channels(num_features, input.device, state.group, error, layer_id=0, call_index=0)
        return 0


_FUNCTIONAL: dict[str, _FunctionalCalls] = {}


@torch.compiler.assume_constant_result
def _functional_key(group_name: str) -> int:
    # Run (not traced) by Dynamo, its result a constant of the graph: one key per process group.
    calls = _FUNCTIONAL.get(group_name)
    if calls is None:
        calls = _FUNCTIONAL[group_name] = _FunctionalCalls(group_name)
        calls.key = register(calls)
    return calls.key


def _state(key: int) -> Any:
    # The layer's sync state (call count, channel check, group, layer id): the one its eager calls use.
    return _layer(key)._current_sync_state()


def _output_like(input: Tensor) -> Tensor:
    # The kernels write in the layout memory_format() picks; the fake kernels promise the same strides.
    return torch.empty_like(input.contiguous(memory_format=memory_format(input)))


@torch.library.custom_op("syncbn::forward", mutates_args=())
def forward_op(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    order: Tensor,
    eps: float,
    num_features: int,
    layer_key: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Synced forward: ``(output, stats (2, C): mean and biased var, info [count, call index] on CPU)``."""
    layer = _layer(layer_key)
    state = layer._current_sync_state()
    if isinstance(layer, _FunctionalCalls):
        call_index = layer.begin_call(state, input, num_features)
    else:
        call_index = layer.begin_sync_call(state, input)
    used, out, mean, var, count = forward_stats_and_normalize(
        input,
        weight,
        bias,
        None,  # running stats: the next op updates them (an op with autograd may not mutate its inputs)
        None,
        eps=eps,
        momentum=0.0,
        num_features=num_features,
        layer_id=state.layer_id,
        call_index=call_index,
        process_group=state.group,
    )
    if out.stride() != used.stride():  # keep the fake kernel's promise (only odd size-1 strides differ)
        out = torch.empty_like(used).copy_(out)
    info = torch.tensor([count, float(call_index)], dtype=torch.float64)
    return out, torch.stack([mean, var]), info


@forward_op.register_fake
def _(input, weight, bias, order, eps, num_features, layer_key):
    stats = input.new_empty((2, max(num_features, 0)), dtype=stats_dtype(input.dtype))
    return _output_like(input), stats, torch.empty(2, dtype=torch.float64)


_MUTATED = ("running_mean", "running_var", "order")


@torch.library.custom_op("syncbn::update_running_stats", mutates_args=_MUTATED)
def update_running_stats_op(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    order: Tensor,
    stats: Tensor,
    info: Tensor,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    layer_key: int,
) -> None:
    """The eager path's running-stat update, from :func:`forward_op`'s global stats and count."""
    order.add_(1)
    mean, var = stats.unbind()
    ws = kernels.workspace(_state(layer_key).layer_id, mean.numel(), mean.device)
    factor = momentum_factor(momentum, num_batches_tracked)
    kernels.update_running(running_mean, running_var, mean, var, ws, momentum=factor, count=info[0].item())


@update_running_stats_op.register_fake
def _(running_mean, running_var, order, stats, info, num_batches_tracked, momentum, layer_key):
    return None


@torch.library.custom_op("syncbn::backward", mutates_args=())
def backward_op(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    info: Tensor,
    after: Tensor | None,
    eps: float,
    num_features: int,
    layer_key: int,
    need_input: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Synced backward: ``(grad input (empty unless need_input), local grad weight, local grad bias,
    token)``. ``after`` is the token of the backward op that must run before this one (unused here)."""
    state = _state(layer_key)
    count, call_index = info.tolist()
    fmt = memory_format(input)
    x = input.contiguous(memory_format=fmt)  # the layout forward ran in (a no-op unless oddly strided)
    mean, var = stats.unbind()
    grad_input, grad_weight, grad_bias = backward_reduce_and_grad(
        grad_output.contiguous(memory_format=fmt),
        x,
        weight,
        mean,
        var,
        eps=eps,
        count=count,
        num_features=num_features,
        layer_id=state.layer_id,
        call_index=int(call_index),
        process_group=state.group,
        need_input=need_input,
    )
    if grad_input is None:
        grad_input = input.new_empty(0)
    elif grad_input.stride() != x.stride():
        grad_input = torch.empty_like(x).copy_(grad_input)
    return grad_input, grad_weight, grad_bias, info.new_zeros(1)


@backward_op.register_fake
def _(grad_output, input, weight, stats, info, after, eps, num_features, key, need_input):
    grad_input = _output_like(input) if need_input else input.new_empty(0)
    grads = stats.new_empty(num_features), stats.new_empty(num_features)
    return grad_input, *grads, info.new_empty(1)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    input, weight, bias, _order, eps, num_features, key = inputs
    _, stats, info = output
    ctx.mark_non_differentiable(stats, info)
    ctx.save_for_backward(input, weight, stats, info)
    ctx.args = (eps, num_features, key)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _previous_backward() -> Tensor | None:
    # The backward formulas of one compiled graph run one after another while AOTAutograd traces them;
    # a token from another trace (or from no trace) must not leak into this one.
    trace, token = _LAST_BACKWARD
    mode = get_proxy_mode()
    return token if mode is not None and trace is not None and trace() is mode else None


def _backward(ctx, grad_output: Tensor, _grad_stats: Any, _grad_info: Any) -> tuple:
    input, weight, stats, info = ctx.saved_tensors
    eps, num_features, key = ctx.args
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    if grad_output is None:  # the output is unused: still join the collective the other ranks run
        grad_output = torch.zeros_like(input)
    grad_input, grad_weight, grad_bias, token = backward_op(
        grad_output, input, weight, stats, info, _previous_backward(), eps, num_features, key, need_input
    )
    mode = get_proxy_mode()
    _LAST_BACKWARD[:] = (weakref.ref(mode), token) if mode is not None else (None, None)
    # Weight/bias grads stay local (DDP averages them), as in eager and in torch.nn.SyncBatchNorm.
    return (
        grad_input if need_input else None,
        grad_weight.to(weight.dtype) if need_weight else None,
        grad_bias.to(ctx.bias_dtype) if need_bias else None,
        None,
        None,
        None,
        None,
    )


forward_op.register_autograd(_backward, setup_context=_setup_context)


def sync_batch_norm(
    layer: torch.nn.Module,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    eps: float,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
) -> Tensor:
    """A synced training call of ``layer`` (a SyncBatchNorm, or a converted subclass) as Dynamo traces it:
    two ops. ``momentum=None`` with ``num_batches_tracked`` is the cumulative average, as in torch."""
    key = layer._compile_key
    out, stats, info = forward_op(input, weight, bias, _ORDER, eps, layer.num_features, key)
    update_running_stats_op(
        running_mean, running_var, _ORDER, stats, info, num_batches_tracked, momentum, key
    )
    return out


def functional_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    momentum: float,
    eps: float,
    num_features: int,
    process_group: comms.ProcessGroup,
) -> Tensor:
    """``sync_batch_norm()`` in training as Dynamo traces it: the layer's ops, keyed by the process group."""
    key = _functional_key(comms.group_name(process_group))
    out, stats, info = forward_op(input, weight, bias, _ORDER, eps, num_features, key)
    update_running_stats_op(running_mean, running_var, _ORDER, stats, info, None, momentum, key)
    return out
