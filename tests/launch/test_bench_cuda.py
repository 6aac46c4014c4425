"""launch/bench_cuda.py: counting kernels and syncs from profiler events, and the W=1 synced variants.

The counting runs on stand-in events anywhere; the profiler and both synced paths run on a GPU (marked
gpu, so `make test-gpu` runs them).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from launch import bench_cuda

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CPU, CUDA = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA


def test_count_events_counts_kernels_and_host_syncs_only():
    events = [
        SimpleNamespace(name="aten::batch_norm", device_type=CPU),
        SimpleNamespace(name="cudaLaunchKernel", device_type=CPU),
        SimpleNamespace(name="void batch_norm_collect_statistics_kernel<...>", device_type=CUDA),
        SimpleNamespace(name="ncclDevKernel_AllReduce_Sum_f64_RING_LL", device_type=CUDA),
        SimpleNamespace(name="Memcpy DtoH (Device -> Pinned)", device_type=CUDA),
        SimpleNamespace(name="Memset (Device)", device_type=CUDA),
        SimpleNamespace(name="cudaStreamSynchronize", device_type=CPU),
        SimpleNamespace(name="cudaDeviceSynchronize", device_type=CPU),  # the profiler's own, at the end
    ]
    assert bench_cuda.count_events(events) == (2, 1)


def test_device_info_is_empty_on_cpu():
    assert bench_cuda.device_info(torch.device("cpu")) == {}


@pytest.mark.gpu
@needs_cuda
def test_profile_counts_sees_the_kernels_and_the_sync_of_a_host_read():
    dev = torch.device("cuda", 0)
    x = torch.randn(8, 4, 5, 5, device=dev, requires_grad=True)
    w, b = torch.ones(4, device=dev, requires_grad=True), torch.zeros(4, device=dev, requires_grad=True)

    def step():
        F.batch_norm(x, None, None, w, b, True).sum().backward()

    kernels, syncs = bench_cuda.profile_counts(step, dev)
    assert kernels >= 2 and syncs == 0
    kernels, syncs = bench_cuda.profile_counts(lambda: x.sum().item(), dev)
    assert kernels >= 1 and syncs >= 1
    info = bench_cuda.device_info(dev)
    assert info["gpu"] == torch.cuda.get_device_name(dev) and info["cuda"] == torch.version.cuda


@pytest.mark.gpu
@needs_cuda
def test_both_synced_paths_run_at_world_size_one(world_of_one):
    dev = torch.device("cuda", 0)
    group = dist.new_group([0])
    x = torch.randn(8, 4, 5, 5, device=dev, requires_grad=True)
    dy = torch.randn_like(x)
    variants = bench_cuda.torch_variants(x, dy, group, 1)
    assert set(variants) == {"synced", "torch"}
    grads = []
    for fn in variants.values():
        x.grad = None
        fn()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)  # the same math, two codes
    ms = {"syncbn": 1.0, "synced": 0.5, "torch": 1.0}
    figures = bench_cuda.figures(ms, variants, dev, leaves=(x,))
    assert figures["torch_ratio"] == 2.0
    assert figures["kernels_synced"] > 0 and figures["kernels_torch"] > 0
