"""SyncBatchNorm: a drop-in for ``torch.nn.SyncBatchNorm`` that also runs on CPU with gloo.

Same constructor, parameters, buffers and state_dict keys. In training with more than one rank it
normalizes with the statistics of the concatenated global batch (see :mod:`syncbn.functional`);
otherwise it is plain ``F.batch_norm`` with no collective.
"""

from __future__ import annotations

import inspect
import itertools
import weakref
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from . import comms, compiled
from .functional import _apply, _local_batch_norm, check_channels, input_error, momentum_factor

# Recent torch has a keyword-only `bias` flag on BatchNorm (2.13 has it, 2.11 does not). On older torch
# (our floor is 2.4) a layer without a bias is built with one and then drops it, as the flag would.
_HAS_BIAS_ARG = "bias" in inspect.signature(_NormBase.__init__).parameters
# Layers are numbered in construction order, counted from the first layer that syncs: the same on every
# rank that builds the same model, so a call tag can tell layers apart without any exchange, even when a
# rank built other SyncBatchNorm layers first that never sync (say, rank 0 alone, in eval mode).
_CONSTRUCTED = itertools.count(1)
# Per sync group: (world token, construction number of the first layer that synced on that group). Per
# group, because ranks may have synced other layers on other groups first (bench: W=2 rows, then W=4).
# Weak: a destroyed group's entry goes with it.
_FIRST_SYNCED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layer_id(constructed: int, token: Any, group: Any) -> int:
    key = token if group is None else group  # None: NCCL's default group, used as given
    first = _FIRST_SYNCED.get(key)
    if first is None or first[0] is not token:
        first = _FIRST_SYNCED[key] = (token, constructed)
    return constructed - first[1] + 1  # the first layer that syncs is #1; 0 is the functional form's


def bias_kwargs(bias: bool) -> dict:
    """The constructor keywords for ``bias`` that this torch accepts (none when it has no such flag)."""
    return {"bias": False} if not bias and _HAS_BIAS_ARG else {}


def drop_bias(norm: _NormBase) -> _NormBase:
    """Make an affine norm bias-free, as a recent torch's ``bias=False`` does: ``bias`` becomes None."""
    if norm.affine and norm.bias is not None:
        norm.register_parameter("bias", None)
    return norm


class _SyncState:
    """Python-side state of a layer's synced calls, passed to the compute as plain values."""

    __slots__ = ("_group", "calls", "channels_checked", "layer_id", "process_group", "sync", "token")

    def __init__(self, token: Any, process_group: Any, sync: bool, group: Any, layer_id: int) -> None:
        self.token, self.process_group, self.sync = token, process_group, sync
        # Weak: a layer that outlives destroy_process_group() must not keep SyncBN's private group (and
        # its gloo threads) alive; the state is rebuilt for the next world anyway (the token changes).
        self._group = (lambda: None) if group is None else weakref.ref(group)
        self.layer_id = layer_id  # the call tag's layer number
        self.calls = 0  # synced calls so far: the call tag's index
        self.channels_checked = False  # set once all ranks agreed on num_features

    @property
    def group(self) -> Any:
        return self._group()


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization over ``(N, C, *)`` input with statistics reduced across ``process_group``.

    Subclasses ``_BatchNorm`` (like every torch BatchNorm) but not ``torch.nn.SyncBatchNorm``, whose
    CUDA-only checks (in DDP, for instance) would refuse CPU modules.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        if num_features <= 0:
            raise ValueError(f"SyncBatchNorm needs num_features >= 1, got {num_features}")
        kwargs = {"device": device, "dtype": dtype, **bias_kwargs(bias)}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        if not bias:
            drop_bias(self)
        self.process_group = comms.resolve_group(process_group)  # a ProcessGroup or a 1-D DeviceMesh
        self._constructed = next(_CONSTRUCTED)
        self._sync_state: _SyncState | None = None  # built on the first training call
        self._compile_key = compiled.register(self)

    def __getstate__(self) -> dict:
        # Copies and pickles (deepcopy for an EMA model, torch.save) carry no process group object; a
        # copy re-resolves its group and re-checks channels on its first synced call.
        state = self.__dict__.copy()
        state["_sync_state"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_constructed" not in state:  # pickled by an older syncbn
            self._constructed = next(_CONSTRUCTED)
            self._sync_state = None
        # A copy keeps its construction number (so its layer id, which every rank computes alike) but
        # gets its own key: the compiled ops find this layer, not its original, by it.
        self._compile_key = compiled.register(self)

    def _current_sync_state(self) -> _SyncState:
        """This layer's sync state for the current world and ``process_group``, so a synced forward does
        not look its group up again; a new world (destroyed and re-initialized) or a new group starts the
        channel check and the call count afresh, on every rank alike."""
        state, token = self._sync_state, comms.world_token()
        if state is None or state.token is not token or state.process_group is not self.process_group:
            sync = comms.world_size(self.process_group) > 1
            group = comms.private_group(self.process_group) if sync else None
            layer_id = _layer_id(self._constructed, token, group) if sync else 0
            state = self._sync_state = _SyncState(token, self.process_group, sync, group, layer_id)
        return state

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected at least 2D input (N, C, *), got {input.dim()}D input")

    def forward(self, input: Tensor) -> Tensor:
        training, momentum, tracked = self.training, self.momentum, self.num_batches_tracked
        # Momentum and counters follow torch's _BatchNorm exactly (momentum=None: cumulative average).
        tracking = training and self.track_running_stats and tracked is not None
        # Sync only in training (which always uses batch stats) with more than one rank in the group.
        compiling = torch.compiler.is_compiling()
        state = self._current_sync_state() if training and not compiling else None
        eager_sync = state is not None and state.sync
        if tracking and not eager_sync:  # the eager synced path counts the batch with the running stats
            tracked.add_(1)

        # Batch stats in training, or in eval when there are no running stats to use.
        running_mean, running_var = self.running_mean, self.running_var
        bn_training = training or (running_mean is None and running_var is None)
        if training and not self.track_running_stats:
            running_mean = running_var = None

        if training and compiling and comms.world_size(self.process_group) > 1:
            # Under torch.compile the synced step is opaque ops, one all-reduce each way (syncbn.compiled).
            return compiled.sync_batch_norm(
                self,
                input,
                self.weight,
                self.bias,
                running_mean,
                running_var,
                eps=self.eps,
                momentum=momentum,
                num_batches_tracked=tracked if tracking else None,
            )
        if not eager_sync:
            return _local_batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                training=bn_training,
                momentum=momentum_factor(momentum, tracked if tracking else None),
                eps=self.eps,
            )
        # The factor for the count the batch is about to reach (the update adds the 1)
        factor = momentum_factor(momentum, tracked if tracking else None, pending=1)
        return self._sync_apply(
            state,
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            momentum=factor,
            eps=self.eps,
            num_batches_tracked=tracked if tracking else None,
        )

    def _sync_apply(
        self,
        state: _SyncState,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        *,
        momentum: float,
        eps: float,
        num_batches_tracked: Tensor | None = None,
    ) -> Tensor:
        """One synced eager call of this layer: count it, check channels on the first, run the function
        (which adds 1 to ``num_batches_tracked``, when given, with the running stats).

        Also the entry for converted BatchNorm subclasses (syncbn.subclass), whose own forward supplies
        the arguments (and counts its batches itself).
        """
        return _apply(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            eps=eps,
            momentum=momentum,
            num_features=self.num_features,
            process_group=state.group,
            layer_id=state.layer_id,
            call_index=self.begin_sync_call(state, input),
            num_batches_tracked=num_batches_tracked,
        )

    def begin_sync_call(self, state: _SyncState, input: Tensor) -> int:
        """Count a synced call (its index goes into the call tag) and, on the first, check the channels.

        Eager and compiled calls share this and ``state``, so their call tags agree: a step that Dynamo
        runs eagerly (a fallback) pairs up with the other ranks' compiled steps.
        """
        call_index = state.calls
        state.calls += 1  # counted on every rank before anything can fail
        if not state.channels_checked:
            # First synced call: a fixed-size check that every rank's layer has the same C, because the
            # stats vector (2C+5) of mismatched ranks would abort gloo. Never repeated for this layer.
            error = input_error(input, self.num_features)
            check_channels(
                self.num_features,
                input.device,
                state.group,
                error,
                layer_id=state.layer_id,
                call_index=call_index,
            )
            state.channels_checked = True
        return call_index

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: Any | None = None
    ) -> torch.nn.Module:
        """Same as :func:`syncbn.convert_sync_batchnorm` (kept for torch drop-in compatibility)."""
        from .convert import convert_sync_batchnorm

        return convert_sync_batchnorm(module, process_group)
