"""SyncBatchNorm: a drop-in for ``torch.nn.SyncBatchNorm`` that also runs on CPU with gloo.

Same constructor, parameters, buffers and state_dict keys. In training with more than one rank it
normalizes with the statistics of the concatenated global batch (see :mod:`syncbn.functional`);
otherwise it is plain ``F.batch_norm`` with no collective.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from . import comms
from .functional import _apply, _local_batch_norm, check_channels, input_error

_HAS_BIAS_ARG = "bias" in inspect.signature(_NormBase.__init__).parameters
# Layer ids in construction order: the same on every rank that builds the same model, so a call tag can
# tell layers apart without any exchange. 0 is the functional form's.
_LAYER_IDS = itertools.count(1)


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
        kwargs = {"device": device, "dtype": dtype}
        if not bias:  # only recent torch has the keyword-only `bias` flag
            if not _HAS_BIAS_ARG:
                raise ValueError(f"bias=False needs a newer torch than {torch.__version__}")
            kwargs["bias"] = False
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **kwargs)
        self.process_group = comms.resolve_group(process_group)  # a ProcessGroup or a 1-D DeviceMesh
        self._layer_id = next(_LAYER_IDS)
        self._reset_sync_state()

    def _reset_sync_state(self) -> None:
        # Set after the first synced call confirmed that all ranks agree on num_features.
        self._channels_checked = False
        self._sync_calls = 0  # synced (training, world size > 1) calls so far: the call tag's index
        self._sync_cache = None  # (world token, process_group, sync?, group the collectives run on)

    def __getstate__(self) -> dict:
        # Copies and pickles (deepcopy for an EMA model, torch.save) carry no process group object.
        state = self.__dict__.copy()
        state["_sync_cache"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if "_layer_id" not in state:  # pickled by an older syncbn
            self._layer_id = next(_LAYER_IDS)
            self._reset_sync_state()

    def _sync_group(self) -> tuple[bool, Any]:
        """(whether there is anybody to sync with, the group this layer's collectives run on).

        Cached for the current world and ``process_group``, so a synced forward does not look it up again;
        a new world (destroyed and re-initialized) starts the layer's checks and call count afresh.
        """
        token, cache = comms.world_token(), self._sync_cache
        if cache is not None and cache[0] is token and cache[1] is self.process_group:
            return cache[2], cache[3]
        if cache is not None and cache[0] is not token:
            self._reset_sync_state()
        sync = comms.world_size(self.process_group) > 1
        group = comms.private_group(self.process_group) if sync else None
        self._sync_cache = (token, self.process_group, sync, group)
        return sync, group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected at least 2D input (N, C, *), got {input.dim()}D input")

    def forward(self, input: Tensor) -> Tensor:
        # Momentum and counters follow torch's _BatchNorm exactly (momentum=None: cumulative average).
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum

        # Batch stats in training, or in eval when there are no running stats to use.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None

        # Sync only in training (which always uses batch stats) with more than one rank in the group.
        sync, group = self._sync_group() if self.training else (False, None)
        if not sync:
            return _local_batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                training=bn_training,
                momentum=factor,
                eps=self.eps,
            )
        return self._sync_apply(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            momentum=factor,
            eps=self.eps,
            group=group,
        )

    def _sync_apply(
        self,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        *,
        momentum: float,
        eps: float,
        group: Any,
    ) -> Tensor:
        """One synced call of this layer: count it, check channels on the first, run the function.

        Also the entry for converted BatchNorm subclasses (syncbn.subclass), whose own forward supplies
        the arguments.
        """
        call_index = self._sync_calls
        self._sync_calls = call_index + 1  # counted on every rank before anything can fail
        if not self._channels_checked:
            # First synced call: a fixed-size check that every rank's layer has the same C, because the
            # stats vector (2C+5) of mismatched ranks would abort gloo. Never repeated for this layer.
            error = input_error(input, self.num_features)
            check_channels(
                self.num_features, input.device, group, error, layer_id=self._layer_id, call_index=call_index
            )
            self._channels_checked = True
        return _apply(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            eps=eps,
            momentum=momentum,
            num_features=self.num_features,
            process_group=group,
            layer_id=self._layer_id,
            call_index=call_index,
        )

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: Any | None = None
    ) -> torch.nn.Module:
        """Same as :func:`syncbn.convert_sync_batchnorm` (kept for torch drop-in compatibility)."""
        from .convert import convert_sync_batchnorm

        return convert_sync_batchnorm(module, process_group)
