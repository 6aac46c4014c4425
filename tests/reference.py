"""The yardstick: single-process torch BatchNorm on the concatenated global batch, in float64.

The helpers live in syncbn.testing (task=check uses them too); the tests import them from here under
short names, next to the naive formula the numerics tests measure against.
"""

from __future__ import annotations

import torch

from syncbn.testing import TOLERANCE, compare_step, rows_of
from syncbn.testing import reference_batch_norm as reference_bn
from syncbn.testing import relative_error as rel_err

__all__ = ["TOLERANCE", "compare_step", "naive_var", "reference_bn", "rel_err", "rows_of"]


def naive_var(x: torch.Tensor) -> torch.Tensor:
    """E[x^2] - E[x]^2 over all but the channel dim, in x's dtype: the formula we must not use."""
    dims = [0, *range(2, x.dim())]
    return (x * x).mean(dims) - x.mean(dims) ** 2
