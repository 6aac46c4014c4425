"""syncbn.testing, the float64 yardstick shared by the tests and task=check: it must pass a correct layer and
catch a wrong one (a yardstick that cannot fail proves nothing).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from syncbn import SyncBatchNorm
from syncbn.testing import TOLERANCE, compare_step, reference_batch_norm, relative_error, rows_of


def test_reference_matches_the_input_rank():
    assert isinstance(reference_batch_norm(2, 3), nn.BatchNorm1d)
    assert isinstance(reference_batch_norm(3, 3), nn.BatchNorm1d)
    assert isinstance(reference_batch_norm(4, 3), nn.BatchNorm2d)
    assert isinstance(reference_batch_norm(5, 3, momentum=None), nn.BatchNorm3d)
    assert reference_batch_norm(4, 3).weight.dtype == torch.float64
    with pytest.raises(ValueError, match="input rank must be 2 to 5"):
        reference_batch_norm(6, 3)


def test_rows_and_relative_error():
    assert rows_of(0, [2, 0, 3]) == slice(0, 2) and rows_of(1, [2, 0, 3]) == slice(2, 2)
    assert rows_of(2, [2, 0, 3]) == slice(2, 5)
    assert relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])) == pytest.approx(0.2)
    assert relative_error(torch.tensor([0.1]), torch.tensor([0.0])) == pytest.approx(0.1)  # floor of 1
    assert relative_error(torch.empty(0), torch.empty(0)) == 0.0
    assert set(TOLERANCE) == {torch.float64, torch.float32, torch.bfloat16, torch.float16}


@pytest.mark.parametrize("shape", [(6, 3), (6, 3, 4), (6, 3, 2, 2), (6, 3, 2, 2, 2)])
def test_compare_step_passes_a_correct_layer_and_catches_a_wrong_one(world_of_one, shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    layer = SyncBatchNorm(3, dtype=torch.float64)
    reference = reference_batch_norm(len(shape), 3)
    out, errors = compare_step(layer, reference, x, dy, slice(0, shape[0]))
    assert set(errors) == {"output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"}
    assert max(errors.values()) < TOLERANCE[torch.float64] and out.shape == x.shape
    assert layer.weight.grad is None and reference.weight.grad is None  # cleared for the next step

    # A layer with another momentum and eps: outputs and running stats are off, and the helper says so.
    wrong = SyncBatchNorm(3, eps=0.5, momentum=0.9, dtype=torch.float64)
    _, errors = compare_step(wrong, reference_batch_norm(len(shape), 3), x, dy, slice(0, shape[0]))
    assert errors["output"] > 1e-3 and errors["running_mean"] > 1e-3 and errors["running_var"] > 1e-3


def test_compare_step_without_affine_or_running_stats(world_of_one):
    x, dy = torch.randn(8, 2, 3, dtype=torch.float64), torch.randn(8, 2, 3, dtype=torch.float64)
    options = {"affine": False, "track_running_stats": False}
    layer = SyncBatchNorm(2, dtype=torch.float64, **options)
    _, errors = compare_step(layer, reference_batch_norm(3, 2, **options), x, dy, slice(0, 8))
    assert set(errors) == {"output", "grad_input"} and max(errors.values()) < 1e-10
