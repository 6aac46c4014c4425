"""Synced BatchNorm subclasses: a subclass keeps its forward, children and attributes; only its stats sync.

Used by :func:`syncbn.convert_sync_batchnorm` for every BatchNorm subclass (timm's ``BatchNormAct2d``, a layer
with extra attributes, one that calls ``super().forward``): rebuilding those as a plain SyncBatchNorm would
drop what they add (an activation, dropout, a scale) and silently change the model.

How. The converted layer is a shallow copy of the original whose class is ``synced_class(type(original))``,
a subclass generated once per original class. Its MRO is ``Sync<Cls> -> Cls -> ... -> BatchNorm2d ->
_SubclassSync -> SyncBatchNorm -> _BatchNorm``, so it is an instance of both the original class and
:class:`SyncBatchNorm`. Its forward runs ``Cls.forward`` unchanged. Only in training with more than one rank
does it run it under a ``TorchFunctionMode`` that routes the ``torch.nn.functional.batch_norm`` call made
with this layer's own parameters or buffers to syncbn's synchronized batch norm; every other op passes
through. ``super().forward()`` inside the subclass reaches ``_BatchNorm.forward`` (``_SubclassSync`` puts it
back above SyncBatchNorm's), which ends in that same call. Eval mode and world size 1 run the original
forward as is. Instances pickle, deep-copy and ``torch.save`` through a module-level registry.
Why this design: a converter that rebuilds known classes (copying ``act`` and ``drop``) only handles the
classes it lists; keeping the instance's own class keeps whatever any subclass defines, and intercepting the
one call only inside this layer's forward (never globally) leaves its other arithmetic bit for bit as it was.

Exact or refused. Routing one call is exact only if the layer computes its batch statistics in that call.
So at conversion a deep copy of each subclass layer runs one training forward on a tiny input (batch 2,
size 4 in each spatial dim, of the first rank from 2 to 5 that its ``_check_input_dim`` accepts) under
``torch.no_grad``, with the RNG state restored and any torch.distributed collective refused; it must call
``F.batch_norm`` with its own tensors exactly once. Layers that compute statistics another way (by hand,
another op, their own collective) raise ValueError. The count is checked again on every synced training
call, for forwards whose path depends on the input.
"""

from __future__ import annotations

import copy
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from . import comms, compiled
from .modules import _CONSTRUCTED, SyncBatchNorm

_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)
# Attributes conversion adds to a layer (the same as SyncBatchNorm's); revert removes them again.
ADDED_ATTRIBUTES = ("process_group", "_constructed", "_sync_state", "_compile_key")
# nn.Module's own containers (parameters, buffers, children, hooks): copied so the two objects share
# tensors and children but adding a hook or a child to one does not change the other.
_MODULE_CONTAINERS = frozenset(k for k, v in vars(nn.Module()).items() if isinstance(v, (dict, set)))
_SYNCED: dict = {}  # original class -> its synced class; one per class so isinstance and pickling agree


class _SubclassSync(SyncBatchNorm):
    """Sits under the subclass's torch BatchNorm base in every synced class: it makes ``isinstance(layer,
    SyncBatchNorm)`` true while ``super()`` calls of the subclass still find ``_BatchNorm``'s methods."""

    forward = _BatchNorm.forward
    _check_input_dim = _BatchNorm._check_input_dim


def synced_class(base: type) -> type:
    """The class of converted ``base`` layers: ``base``'s own code, with its batch norm call synced."""
    cls = _SYNCED.get(base)
    if cls is None:
        namespace = {
            "forward": _synced_forward,
            "__reduce_ex__": _reduce_ex,
            "_syncbn_base": base,
            "__module__": __name__,
            "__doc__": f"{base.__qualname__} whose batch statistics are synced by syncbn.",
        }
        cls = types.new_class(
            f"Sync{base.__name__}", (base, _SubclassSync), exec_body=lambda ns: ns.update(namespace)
        )
        cls = _SYNCED.setdefault(base, cls)
    return cls


def is_synced(module: nn.Module) -> bool:
    return "_syncbn_base" in vars(type(module))


def synced_copy(layer: _BatchNorm, process_group: Any) -> nn.Module:
    """A converted copy of ``layer`` sharing its parameters, buffers and children (call ``check`` first)."""
    new = _copy_as(layer, synced_class(type(layer)), skip=())
    new.process_group = process_group
    new._constructed = next(_CONSTRUCTED)  # in conversion order, so every rank numbers its layers alike
    new._sync_state = None
    new._compile_key = compiled.register(new)  # how its torch.compile ops find it
    return new


def unsynced_copy(layer: nn.Module) -> nn.Module:
    """The layer as its original class again, sharing parameters, buffers and children."""
    return _copy_as(layer, type(layer)._syncbn_base, skip=ADDED_ATTRIBUTES)


def _copy_as(layer: nn.Module, cls: type, skip: tuple) -> nn.Module:
    new = object.__new__(cls)
    for key, value in vars(layer).items():
        if key not in skip:
            vars(new)[key] = value.copy() if key in _MODULE_CONTAINERS else value
    return new


def _rebuild(base: type) -> nn.Module:
    """Unpickling entry point: an empty instance of ``base``'s synced class (its state is set afterwards)."""
    return object.__new__(synced_class(base))


def _reduce_ex(self, protocol):
    # The generated class is not importable by name, so pickle and deepcopy rebuild it from the original.
    return _rebuild, (type(self)._syncbn_base,), self.__dict__


def _synced_forward(self, *args, **kwargs):
    base_forward = type(self)._syncbn_base.forward
    if not self.training or comms.world_size(self.process_group) == 1:
        return base_forward(self, *args, **kwargs)
    route = _BatchNormRoute(self, sync=True)
    with route:  # not `as route`: under torch.compile, entering a mode does not return it
        output = base_forward(self, *args, **kwargs)
    if route.calls != 1:
        # Every rank that took this path raises here. A rank whose input took the routed path meanwhile
        # waits in its all-reduce and fails at the process group's timeout, with the message saying why.
        raise RuntimeError(
            f"SyncBatchNorm: a converted {type(self)._syncbn_base.__qualname__} layer called "
            f"torch.nn.functional.batch_norm with its own parameters/buffers {route.calls} times in this "
            "training forward (expected exactly 1, as when it was converted), so its statistics were not "
            "synced exactly. Its forward takes another path for this input; make it normalize through one "
            "F.batch_norm (or super().forward()) call, or revert the model and use a plain BatchNorm."
        )
    return output


class _BatchNormRoute(TorchFunctionMode):
    """Counts (and, with ``sync``, synchronizes) the F.batch_norm calls that use ``layer``'s own tensors."""

    def __init__(self, layer: _BatchNorm, sync: bool) -> None:
        super().__init__()
        self.layer, self.sync, self.calls = layer, sync, 0
        own = (layer.running_mean, layer.running_var, layer.weight, layer.bias)
        self.own = [t for t in own if t is not None]

    def _is_own(self, tensors: tuple) -> bool:
        # A layer with no parameters or buffers at all owns every batch_norm call of its forward.
        return not self.own or any(t is o for t in tensors for o in self.own)

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            call.apply_defaults()
            a = call.arguments
            if self._is_own((a["running_mean"], a["running_var"], a["weight"], a["bias"])):
                self.calls += 1
                # A training=False call in training (frozen statistics) needs no sync: it stays local.
                if self.sync and a["training"]:
                    return _synced_batch_norm(self.layer, a)
        return func(*args, **kwargs)


def _synced_batch_norm(layer: Any, a: dict) -> torch.Tensor:
    """The routed call: the subclass's own arguments, with global-batch statistics."""
    if torch.compiler.is_compiling():  # the same opaque ops as SyncBatchNorm's (see syncbn.compiled)
        return compiled.sync_batch_norm(
            layer,
            a["input"],
            a["weight"],
            a["bias"],
            a["running_mean"],
            a["running_var"],
            eps=a["eps"],
            momentum=a["momentum"],
            num_batches_tracked=None,  # the subclass's forward already turned momentum=None into a factor
        )
    return layer._sync_apply(
        layer._current_sync_state(),
        a["input"],
        a["weight"],
        a["bias"],
        a["running_mean"],
        a["running_var"],
        momentum=a["momentum"],
        eps=a["eps"],
    )


_FIX = (
    "What you can do: make its forward normalize through exactly one torch.nn.functional.batch_norm (or "
    "super().forward()) call with its own running_mean/running_var/weight/bias, or build the model with a "
    "plain torch BatchNorm followed by separate layers for what the subclass adds."
)


def check(layer: _BatchNorm, path: str) -> None:
    """Raise ValueError (naming the class, ``path`` and a fix) unless ``layer`` can be synced exactly."""
    torch_base = next(c for c in type(layer).__mro__ if c.__module__.startswith("torch."))
    base_name = torch_base.__name__
    base_name = (
        f"torch.nn.{base_name}" if not base_name.startswith("_") else f"{torch_base.__module__}.{base_name}"
    )
    where = f"'{path}'" if path else "the root module"
    where += f" ({type(layer).__module__}.{type(layer).__qualname__}, a {base_name} subclass)"
    reason, fix = None, _FIX
    clash = [name for name in ADDED_ATTRIBUTES if name in vars(layer)]
    if isinstance(layer, nn.SyncBatchNorm):
        reason = "it subclasses torch.nn.SyncBatchNorm, whose forward runs torch's own synchronization"
        fix = "What you can do: build that layer from its BatchNorm1d/2d/3d form and convert that."
    elif clash:
        reason = f"it already has an attribute {clash[0]!r}, which the synced layer needs for itself"
        fix = f"What you can do: rename the subclass's {clash[0]!r} attribute."
    else:
        try:
            synced_class(type(layer))
            calls, why = _probe(layer)
        except TypeError as e:  # no consistent MRO with SyncBatchNorm
            calls, why = None, f"its class cannot be combined with SyncBatchNorm ({e})"
        if calls is None:
            reason = why
        elif calls != 1:
            reason = (
                f"in a training forward it called torch.nn.functional.batch_norm with its own parameters/"
                f"buffers {calls} times, so it computes its batch statistics some other way (syncbn "
                "routes exactly one such call to the synchronized batch norm)"
            )
    if reason is not None:
        raise ValueError(f"convert_sync_batchnorm: cannot sync {where} exactly: {reason}. {fix}")


class _CollectiveInProbe(Exception):
    pass


class _NoCollectives(TorchDispatchMode):
    """Refuses torch.distributed collectives: conversion runs on each rank alone and must never wait."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional", "c10d_functional"):
            raise _CollectiveInProbe(f"{func.namespace}.{func._opname}")
        return func(*args, **(kwargs or {}))


def _probe(layer: _BatchNorm) -> tuple[int | None, str]:
    """How often one training forward of a copy of ``layer`` calls F.batch_norm with its own tensors.

    ``(None, why)`` when no probe input got through its forward.
    """
    probe = copy.deepcopy(layer).train()  # the user's layer never runs: its buffers stay as they are
    tensors = [*probe.parameters(recurse=False), *probe.buffers(recurse=False)]
    like = next((t for t in tensors if t.is_floating_point()), torch.empty(0))
    device, dtype = like.device, like.dtype
    cuda = [device] if device.type == "cuda" else []
    why = "its _check_input_dim accepts no (N, C, *) input of rank 2 to 5"
    with torch.no_grad(), torch.random.fork_rng(devices=cuda), _NoCollectives():
        for rank in range(2, 6):
            x = torch.randn((2, probe.num_features) + (4,) * (rank - 2), device=device, dtype=dtype)
            try:
                probe._check_input_dim(x)
            except Exception:
                continue
            try:
                with _BatchNormRoute(probe, sync=False) as route:
                    probe.forward(x)  # forward, not __call__: the user's hooks must not see the probe
                return route.calls, ""
            except _CollectiveInProbe as e:
                return None, f"its forward runs a torch.distributed collective ({e}) of its own"
            except Exception as e:
                why = f"its training forward failed on a probe input of shape {tuple(x.shape)}: {e!r}"
    return None, why
