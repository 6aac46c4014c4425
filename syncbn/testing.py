"""The yardstick for synchronized BatchNorm: torch's BatchNorm on the concatenated global batch, in float64.

Used by the test suite and by ``task=check`` (a self-test on a real cluster), like ``torch.testing``: every
rank runs its slice of a seeded global batch through the layer, the reference runs the whole batch, and
compare_step() reports the relative error of everything SyncBN promises to match.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

from . import comms
from .modules import bias_kwargs, drop_bias

# Relative error each input dtype reaches against the float64 reference (outputs and running stats).
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 5e-2,
    torch.float16: 1e-2,
}


def reference_batch_norm(ndim: int, num_features: int, **options) -> nn.Module:
    """torch's BatchNorm1d/2d/3d for input of rank ``ndim`` (2 to 5), in float64 unless ``dtype`` is given;
    ``bias=False`` works on every torch, also those without the flag."""
    classes = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    if ndim not in classes:
        raise ValueError(f"reference_batch_norm: input rank must be 2 to 5 (N, C, *), got {ndim}")
    bias = options.pop("bias", True)
    norm = classes[ndim](num_features, **{"dtype": torch.float64, **options, **bias_kwargs(bias)})
    return norm if bias else drop_bias(norm)


def rows_of(rank: int, splits: list[int]) -> slice:
    """This rank's rows of the global batch when rank r holds ``splits[r]`` rows."""
    start = sum(splits[:rank])
    return slice(start, start + splits[rank])


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| scaled by max(1, max |expected|); 0 for empty tensors."""
    if expected.numel() == 0:
        return 0.0
    diff = (actual.double() - expected.double()).abs().max().item()
    return diff / max(1.0, expected.double().abs().max().item())


def compare_step(
    layer: nn.Module,
    reference: nn.Module,
    global_input: Tensor,
    global_grad: Tensor,
    rows: slice,
    *,
    process_group=None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[Tensor, dict[str, float]]:
    """One training step of ``layer`` on this rank's ``rows`` and of ``reference`` on the whole batch.

    Every rank of ``process_group`` calls it together with the same global tensors. Returns this rank's
    output and the relative errors of output, grad_input, grad_weight, grad_bias (summed over the group:
    they stay local, as DDP expects), running_mean and running_var, whichever the layer has. Parameter
    gradients are cleared afterwards, so steps can follow one another.
    """
    x = global_input[rows].clone(memory_format=memory_format).requires_grad_(True)
    out = layer(x)
    out.backward(global_grad[rows])
    x_ref = global_input.detach().double().requires_grad_(True)
    out_ref = reference(x_ref)
    out_ref.backward(global_grad.double())
    errors = {
        "output": relative_error(out, out_ref[rows]),
        "grad_input": relative_error(x.grad, x_ref.grad[rows]),
    }
    for name in ("weight", "bias"):
        param, param_ref = getattr(layer, name), getattr(reference, name)
        if param is None:
            continue
        grad = param.grad.detach().clone()
        if comms.world_size(process_group) > 1:
            comms.all_reduce_sum(grad, process_group)  # the group's sum is the whole batch's gradient
        errors[f"grad_{name}"] = relative_error(grad, param_ref.grad)
        param.grad = param_ref.grad = None
    if reference.running_mean is not None:
        errors["running_mean"] = relative_error(layer.running_mean, reference.running_mean)
        errors["running_var"] = relative_error(layer.running_var, reference.running_var)
    return out.detach(), errors


def aten_ops(fn: Callable[[], Any]) -> list[str]:
    """The ATen operators ``fn`` dispatches at top level, from Python and autograd: not their callees, nor
    autograd accumulating into a leaf's ``.grad`` (any layer pays that). What a step costs in dispatches."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()

    def top_level(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::") or "AccumulateGrad" in parent.name:
                return False
            parent = parent.cpu_parent
        return True

    return [e.name for e in prof.events() if e.name.startswith("aten::") and top_level(e)]


def gloo_calls(fn: Callable[[], Any]) -> int:
    """How many collectives ``fn`` runs on this rank, gloo's or SyncBN's; an exchange (the sends, then the
    receives, with which syncbn.comms sums over a small group, by gloo or a same-host link) counts as one."""
    from . import links

    before = links.exchanges
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    calls, previous = links.exchanges - before, ""
    for e in prof.events():
        if e.name.startswith("gloo:"):
            # an exchange posts all its sends, then all its receives: a send after anything else starts one
            calls += e.name != "gloo:recv" and not (e.name == "gloo:send" and previous == "gloo:send")
            previous = e.name
    return calls
