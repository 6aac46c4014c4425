"""Device and dtype of every tensor the training job's helpers make or move (launch/train.py, checkpoint.py,
runtime.py).

The `meta` device runs the helpers' tensor code without data and, like CUDA, refuses to mix devices: a host
tensor slipped in among device tensors (as in torch.stack([loss, correct, torch.tensor(n)])) fails here,
on a machine without a GPU. The `cuda` parameters (marked gpu) run the same helpers on a GPU under
`make test-gpu`.
"""

from __future__ import annotations

import logging

import pytest
import torch

from launch import checkpoint, train
from launch.checkpoint import TrainState
from launch.config import compose
from launch.runtime import Context, cuda_device

CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
)
# A one-epoch job on 16 synthetic images: seconds on a CPU.
SMALL = ["experiment=smoke", "data.train.size=16", "data.test.size=8", "task.epochs=1", "task.batch_size=4"]


def make_ctx(device: str, run_dir, overrides: list[str] = ()) -> Context:
    return Context(
        cfg=compose([*SMALL, *overrides]),
        run_dir=run_dir,
        rank=0,
        local_rank=0,
        world_size=1,
        device=torch.device(device, 0) if device == "cuda" else torch.device(device),
        backend="gloo",
        restart_count=0,
        log=logging.getLogger("test_devices"),
    )


def make_state(device: torch.device) -> TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # The run record of SMALL (16 training images, one rank), so a resume under make_ctx() accepts it.
    run = {"world_size": 1, "batch_size": 4, "dataset_size": 16, "epochs": 1, "seed": 0}
    return TrainState(model, opt, run, device)


def one_step(state: TrainState, batch: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = state.epoch_sums.device
    x, y = torch.randn(batch, 4, device=device), torch.randint(0, 3, (batch,), device=device)
    logits = state.model(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    state.record_batch(loss, logits, y)
    return loss, logits, y


@pytest.mark.parametrize("device", ["meta", "cpu", CUDA])
def test_record_batch_keeps_the_epoch_sums_on_their_device(device):
    dev = torch.device(device)
    state = make_state(dev)
    loss, logits, y = one_step(state)
    assert state.epoch_sums.device.type == dev.type and state.epoch_sums.dtype == torch.float64
    if device != "meta":  # meta tensors hold no values
        correct = (logits.argmax(1) == y).sum().item()
        assert state.epoch_sums.tolist() == pytest.approx([loss.item() * 5, correct, 5])


@pytest.mark.parametrize("norm", ["syncbn", "bn"])
@pytest.mark.parametrize("device", ["meta", "cpu", CUDA])
def test_build_model_puts_every_parameter_and_buffer_on_the_device(device, norm, tmp_path):
    ctx = make_ctx(device, tmp_path, [f"norm={norm}"])
    model = train.build_model(ctx)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert tensors and {t.device for t in tensors.values()} == {ctx.device}


def test_cuda_device_shares_gpus_under_gloo_and_refuses_it_under_nccl():
    assert [cuda_device(r, 2, "gloo", 1).index for r in range(2)] == [0, 0]  # two workers, one GPU
    assert [cuda_device(r, 4, "nccl", 4).index for r in range(4)] == [0, 1, 2, 3]
    assert [cuda_device(r, 4, "gloo", 2).index for r in range(4)] == [0, 1, 0, 1]
    with pytest.raises(RuntimeError, match=r"backend nccl needs one GPU per worker: 2 workers .* but 1 GPU"):
        cuda_device(1, 2, "nccl", 1)
    with pytest.raises(RuntimeError, match="no GPU is visible"):
        cuda_device(0, 1, "gloo", 0)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_checkpoint_is_written_in_host_memory_and_resumes_onto_the_device(device, tmp_path, world_of_one):
    ctx = make_ctx(device, tmp_path, ["task.resume=true"])
    state = make_state(ctx.device)
    for _ in range(3):
        one_step(state)
    checkpoint.save(ctx, state)
    locations: list[str] = []

    def record(storage, location):
        locations.append(location)
        return storage

    torch.load(checkpoint.path(tmp_path), map_location=record, weights_only=True)
    assert locations and set(locations) == {"cpu"}  # loads on a machine without the GPU that wrote it

    fresh = make_state(ctx.device)
    assert checkpoint.resume(ctx, fresh)
    assert fresh.step == 3 and fresh.epoch_sums.device == ctx.device
    assert torch.equal(fresh.epoch_sums, state.epoch_sums)
    for (name, a), b in zip(state.model.state_dict().items(), fresh.model.state_dict().values(), strict=True):
        assert b.device == ctx.device and torch.equal(a, b), name
    momentum = [s["momentum_buffer"] for s in fresh.optimizer.state.values()]
    assert momentum and all(m.device == ctx.device for m in momentum)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_whole_training_job_runs_on_the_device(device, tmp_path, world_of_one):
    """train(): DDP, the epoch sums, evaluation, checkpoint and summary, in this process on one rank."""
    import json

    ctx = make_ctx(device, tmp_path)
    train.train(ctx)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"] == ctx.device.type and summary["steps"] == 4
    assert 0 <= summary["final_accuracy"] <= 1 and summary["final_loss"] > 0
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["train_loss"] > 0 and 0 <= row["train_accuracy"] <= 1
