"""BatchNorm subclasses as model zoos write them, for the converter tests (one per way of subclassing).

``BatchNormAct2d`` mirrors timm's structure (act and drop children, own forward calling F.batch_norm);
the others add attributes only, call ``super().forward``, or compute their statistics in ways that cannot be
synced exactly (by hand; by hand for large batches only; with a collective of their own).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

TIMM_MODELS = ["efficientnet_b0", "mobilenetv3_small_100"]  # both built from BatchNormAct2d layers


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d + dropout + activation in one layer, with its own forward (timm's BatchNormAct2d shape)."""

    def __init__(self, num_features: int, act: type = nn.SiLU, drop: float = 0.0, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected 4D input, got {x.ndim}D")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        keep = not self.training or self.track_running_stats
        x = F.batch_norm(
            x,
            self.running_mean if keep else None,
            self.running_var if keep else None,
            self.weight,
            self.bias,
            use_batch,
            factor,
            self.eps,
        )
        return self.act(self.drop(x))


class TaggedBatchNorm1d(nn.BatchNorm1d):
    """Adds attributes only (as detection code does to mark frozen or special layers)."""

    def __init__(self, num_features: int, tag: str = "neck", **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.tag = tag
        self.lr_scale = 0.5


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """Calls ``super().forward`` and post-processes: a learnable residual gate and a fixed offset."""

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.gate = nn.Parameter(torch.full((num_features, 1, 1), 0.5, **_factory(kwargs)))
        self.register_buffer("offset", torch.linspace(-1, 1, num_features, **_factory(kwargs)).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gate + self.offset + 0.1 * x


class HandStatsBatchNorm2d(nn.BatchNorm2d):
    """Computes mean and variance by hand: nothing syncbn could route, so conversion must refuse it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(x.var((0, 2, 3)), self.momentum)
        x = (x - mean[:, None, None]) * torch.rsqrt(var[:, None, None] + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class BigBatchByHandBatchNorm2d(HandStatsBatchNorm2d):
    """F.batch_norm for small batches (the conversion probe's), by hand above: caught when training."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= 2:
            return nn.BatchNorm2d.forward(self, x)
        return super().forward(x)


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """Already syncs itself with its own collective (as hand-written SyncBNs do); counts its all-reduces."""

    all_reduces = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and dist.is_initialized():
            mean = x.mean((0, 2, 3))
            type(self).all_reduces += 1
            dist.all_reduce(mean)
        return super().forward(x)


class TorchSyncAct(nn.SyncBatchNorm):
    """A subclass of torch.nn.SyncBatchNorm with an activation (timm's SyncBatchNormAct shape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


def _factory(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("device", "dtype") if k in kwargs}


def standin_cnn(norm: str) -> nn.Module:
    """A small float64 CNN whose three 2-d norms are the named stand-in, then a TaggedBatchNorm1d."""
    make = {
        "bnact": lambda c, **kw: BatchNormAct2d(c, **kw),
        "scaled": lambda c, **kw: ScaledBatchNorm2d(c, **kw),
        "handstats": lambda c, **kw: HandStatsBatchNorm2d(c, **kw),
        "bigbatch": lambda c, **kw: BigBatchByHandBatchNorm2d(c, **kw),
    }[norm]
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        make(8),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        make(8, momentum=None),
        make(8, affine=False, track_running_stats=False),  # no parameters or buffers of its own
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        TaggedBatchNorm1d(6),
        nn.Linear(6, 4),
    ).double()


def timm_or_skip():
    """timm, or skip the test: timm's torchvision may fail with more than ImportError next to a CPU torch."""
    import pytest

    try:
        import timm
    except Exception as e:
        pytest.skip(f"timm does not import here ({type(e).__name__}: {e})")
    return timm
