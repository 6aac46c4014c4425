"""SyncBatchNorm: a drop-in for ``torch.nn.SyncBatchNorm`` that also runs on CPU with gloo.

Same constructor, parameters, buffers and state_dict keys. In training with more than one rank it
normalizes with the statistics of the concatenated global batch (see :mod:`syncbn.functional`);
otherwise it is plain ``F.batch_norm`` with no collective.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from . import comms
from .functional import _apply, _local_batch_norm, input_error

_HAS_BIAS_ARG = "bias" in inspect.signature(_NormBase.__init__).parameters


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
        # Set after the first synced call confirmed that all ranks agree on num_features.
        self._channels_checked = False

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
        if not self.training or comms.world_size(self.process_group) == 1:
            return _local_batch_norm(
                input, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps
            )

        group = comms.private_group(self.process_group)
        if not getattr(self, "_channels_checked", False):
            # First synced call: a fixed-size check that every rank's layer has the same C, because the
            # stats vector (2C+1) of mismatched ranks would abort gloo. Never repeated for this layer.
            comms.check_num_features(
                self.num_features, input.device, group, input_error(input, self.num_features)
            )
            self._channels_checked = True
        return _apply(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            self.eps,
            factor,
            self.num_features,
            group,
        )

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: Any | None = None
    ) -> torch.nn.Module:
        """Same as :func:`syncbn.convert_sync_batchnorm` (kept for torch drop-in compatibility)."""
        from .convert import convert_sync_batchnorm

        return convert_sync_batchnorm(module, process_group)
