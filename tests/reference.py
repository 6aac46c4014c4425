"""The yardstick: single-process torch BatchNorm on the concatenated global batch, in float64."""

from __future__ import annotations

import torch
from torch import nn


def reference_bn(ndim: int, num_features: int, **options) -> nn.Module:
    """torch's own BatchNorm1d/2d/3d for input of rank ``ndim``, in float64."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[ndim]
    return cls(num_features, dtype=torch.float64, **options)


def rows_of(rank: int, splits: list) -> slice:
    """This rank's rows of the global batch when rank r holds ``splits[r]`` rows."""
    start = sum(splits[:rank])
    return slice(start, start + splits[rank])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| scaled by max(1, max |want|); 0 for empty tensors."""
    if want.numel() == 0:
        return 0.0
    diff = (got.double() - want.double()).abs().max().item()
    return diff / max(1.0, want.double().abs().max().item())


def naive_var(x: torch.Tensor) -> torch.Tensor:
    """E[x^2] - E[x]^2 over all but the channel dim, in x's dtype: the formula we must not use."""
    dims = [0, *range(2, x.dim())]
    return (x * x).mean(dims) - x.mean(dims) ** 2
