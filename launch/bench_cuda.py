"""task=bench on CUDA: the figures only a GPU run has.

- ``torch``: torch.nn.SyncBatchNorm next to ours. At world size 1 both layers skip their collective (plain
  BatchNorm), so the one-GPU comparison calls each one's synced path on a one-rank group instead:
  ``synced`` (ours) against ``torch`` (torch.nn.SyncBatchNorm's autograd Function); ``torch_ratio`` =
  torch / ours (above 1: ours is faster).
- ``kernels_<variant>`` and ``syncs_<variant>``: CUDA kernels one layer step runs and the host syncs it
  waits on (torch.profiler), what decides a small batch's speed on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

# Host-side CUDA calls that wait for the device: a D2H read (.item(), .tolist()) shows up as one of these.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize")
# Columns this module adds to a bench row, in table order (present only in CUDA runs).
COLUMNS = ["synced", "torch", "torch_ratio", "kernels_syncbn", "kernels_synced", "kernels_local"]
COLUMNS += ["kernels_torch", "syncs_syncbn", "syncs_synced", "syncs_torch"]


def device_info(device: torch.device) -> dict[str, Any]:
    """GPU name and the CUDA, cuDNN and NCCL versions torch was built with (empty on CPU)."""
    if device.type != "cuda":
        return {}
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError, TypeError):  # a torch built without NCCL
        nccl = None
    return {
        "gpu": torch.cuda.get_device_name(device),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nccl": nccl,
    }


def torch_variants(x: torch.Tensor, dy: torch.Tensor, group, world: int) -> dict[str, Callable[[], None]]:
    """The steps to time next to ours: torch.nn.SyncBatchNorm, and at world size 1 both synced paths."""
    c, dev = x.shape[1], x.device
    if world > 1:
        theirs = torch.nn.SyncBatchNorm(c, process_group=group, device=dev)
        return {"torch": lambda: theirs(x).backward(dy)}
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncFunction

    from syncbn.functional import _apply

    ours, theirs = torch.nn.BatchNorm1d(c, device=dev), torch.nn.BatchNorm1d(c, device=dev)

    def synced() -> None:
        y = _apply(
            x,
            ours.weight,
            ours.bias,
            ours.running_mean,
            ours.running_var,
            eps=1e-5,
            momentum=0.1,
            num_features=c,
            process_group=group,
        )
        y.backward(dy)

    def torch_synced() -> None:
        args = (theirs.weight, theirs.bias, theirs.running_mean, theirs.running_var, 1e-5, 0.1, group, 1)
        TorchSyncFunction.apply(x, *args).backward(dy)

    return {"synced": synced, "torch": torch_synced}


def count_events(events: Iterable[Any]) -> tuple[int, int]:
    """(GPU kernels, host syncs) among torch.profiler events; copies and fills are not kernels."""
    kernels = syncs = 0
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels += not event.name.startswith(("Memcpy", "Memset"))
        elif event.name in SYNC_CALLS:
            syncs += 1
    return kernels, syncs


def profile_counts(fn: Callable[[], None], device: torch.device) -> tuple[int, int]:
    """(GPU kernels, host syncs) of one call of ``fn`` (every rank of a collective calls it together)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)  # cudaDeviceSynchronize: not counted, and every kernel is recorded
    return count_events(prof.events())


def figures(
    ms: dict[str, float],
    variants: dict[str, Callable[[], None]],
    device: torch.device,
    leaves: tuple[torch.Tensor, ...],
) -> dict[str, float | int]:
    """torch_ratio from the medians ``ms``, then kernels and syncs per step of every variant.

    ``leaves`` lose their gradients before each profiled step, as between timed steps.
    """
    out: dict[str, float | int] = {}
    if "torch" in ms:
        out["torch_ratio"] = round(ms["torch"] / ms.get("synced", ms["syncbn"]), 3)
    for name, fn in variants.items():
        for t in leaves:
            t.grad = None
        out[f"kernels_{name}"], out[f"syncs_{name}"] = profile_counts(fn, device)
    return out
