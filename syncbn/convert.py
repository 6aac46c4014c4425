"""convert_sync_batchnorm / revert_sync_batchnorm: swap BatchNorm layers in a model, both ways.

Conversion shares parameters and buffers (no copies), so optimizers and checkpoints keep working; revert
restores the original class so a trained model serves single-process inference. Plain torch BatchNorm
layers become :class:`SyncBatchNorm`; BatchNorm *subclasses* keep their own code (see
:mod:`syncbn.subclass`) or, when that cannot be exact, conversion refuses before changing anything.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from . import comms, subclass
from .modules import SyncBatchNorm, bias_kwargs


class BatchNormNd(_BatchNorm):
    """Plain BatchNorm for input of any rank >= 2: what revert produces when the original class is unknown."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"BatchNormNd: expected at least 2D input (N, C, *), got {input.dim()}D input")


def _move_state(src: _BatchNorm, dst: _BatchNorm) -> _BatchNorm:
    # Share (not copy) parameters and buffers so the optimizer and any references stay valid.
    with torch.no_grad():
        if src.affine:
            dst.weight, dst.bias = src.weight, src.bias
        dst.running_mean = src.running_mean
        dst.running_var = src.running_var
        dst.num_batches_tracked = src.num_batches_tracked
    dst.train(src.training)
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


def convert_sync_batchnorm(module: nn.Module, process_group: Any | None = None) -> nn.Module:
    """Make every BatchNorm in ``module`` synchronize its statistics across ``process_group``.

    ``BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` become :class:`SyncBatchNorm`. A subclass of them
    becomes a synced layer of its own class that keeps its forward, children and attributes; one that cannot
    be synced exactly raises ``ValueError`` naming it, before any layer is replaced. Children are replaced in
    place; the (possibly new) root is returned, so write ``model = convert_sync_batchnorm(model)``. Layers
    that already are ours get ``process_group`` set. ``process_group`` may be a ProcessGroup or a 1-D
    ``DeviceMesh`` (e.g. ``mesh["dp"]``).
    """
    process_group = comms.resolve_group(process_group)
    for path, child in module.named_modules():
        _check(child, path)
    return _convert(module, process_group)


def _is_plain(module: nn.Module) -> bool:
    return type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, BatchNormNd)


def _check(module: nn.Module, path: str) -> None:
    """Raise if ``module`` cannot be converted; runs on every layer first, so a refusal changes nothing."""
    if not isinstance(module, _BatchNorm) or isinstance(module, SyncBatchNorm):
        return
    if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
        raise ValueError(
            f"convert_sync_batchnorm: {repr(path) if path else 'the root module'} ({type(module).__name__}) "
            "has uninitialized parameters; run one forward pass first so num_features is known"
        )
    if not _is_plain(module):
        subclass.check(module, path)


def _convert(module: nn.Module, process_group: Any) -> nn.Module:
    if isinstance(module, SyncBatchNorm):
        if process_group is not None:
            module.process_group = process_group
        return module
    if isinstance(module, _BatchNorm) and _is_plain(module):
        converted = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
            device=_device_of(module),
            **_bias_kwargs(module),
        )
        converted._original_class = type(module)
        return _move_state(module, converted)
    if isinstance(module, _BatchNorm):
        module = subclass.synced_copy(module, process_group)  # children of the copy convert below
    for name, child in module.named_children():
        new = _convert(child, process_group)
        if new is not child:
            module.add_module(name, new)
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Turn every SyncBatchNorm (ours or torch's) back into plain BatchNorm, sharing parameters and buffers.

    The class is the one the layer was converted from (a BatchNorm subclass with its children and
    attributes, or BatchNorm1d/2d/3d) when known, else :class:`BatchNormNd`, which accepts any input rank
    like SyncBatchNorm does.
    """
    if subclass.is_synced(module):
        module = subclass.unsynced_copy(module)  # its children revert below
    elif isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        cls = getattr(module, "_original_class", None)
        if (
            cls is None
            or issubclass(cls, (SyncBatchNorm, nn.SyncBatchNorm))
            or issubclass(cls, _LazyNormBase)
        ):
            cls = BatchNormNd
        reverted = cls(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=_device_of(module),
            **_bias_kwargs(module),
        )
        return _move_state(module, reverted)
    for name, child in module.named_children():
        new = revert_sync_batchnorm(child)
        if new is not child:
            module.add_module(name, new)
    return module


def _bias_kwargs(module: _BatchNorm) -> dict:
    # Only for an affine norm without a bias, and only where torch has the flag: elsewhere the new layer
    # is built with a bias that _move_state then drops (it assigns the source's None).
    return bias_kwargs(not (module.affine and module.bias is None))


def _device_of(module: nn.Module) -> torch.device | None:
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return t.device
    return None
