"""TrainState (launch/checkpoint.py): what a checkpoint holds, written and read under the same keys."""

from __future__ import annotations

import io

import pytest
import torch

from launch.checkpoint import TrainState


def make_state(world_size: int = 2, lr: float = 0.1) -> TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return TrainState(model, opt, sched, world_size, torch.device("cpu"))


def train_steps(state: TrainState, steps: int, batch_size: int = 3) -> None:
    for _ in range(steps):
        x, y = torch.randn(batch_size, 4), torch.randint(0, 3, (batch_size,))
        logits = state.model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        state.record_batch(loss, logits, y, batch_size)


def test_state_dict_round_trip_restores_everything():
    state = make_state()
    train_steps(state, 5)
    assert state.step == 5 and state.samples_in_epoch == 5 * 3 * 2 and state.batches_done(3) == 5
    assert state.epoch_sums[2].item() == 15  # this rank's samples
    saved = state.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # what resume reads: plain tensors and numbers only

    fresh = make_state(lr=0.5)
    fresh.load_state_dict(loaded)
    assert set(loaded) == set(fresh.state_dict())  # the keys it writes are the keys it reads
    for key, value in fresh.model.state_dict().items():
        assert torch.equal(value, saved["model"][key]), key
    assert fresh.optimizer.param_groups[0]["lr"] == state.optimizer.param_groups[0]["lr"]
    assert fresh.scheduler.last_epoch == 5
    assert (fresh.step, fresh.epoch, fresh.samples_in_epoch) == (5, 0, 30)
    assert fresh.seconds == saved["seconds"] and fresh.elapsed() >= saved["seconds"]
    assert torch.equal(fresh.epoch_sums, state.epoch_sums)
    # The same data and RNG from here on give the same weights.
    torch.manual_seed(1)
    train_steps(state, 2)
    torch.manual_seed(1)
    train_steps(fresh, 2)
    for a, b in zip(state.model.parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_finish_epoch_resets_the_position():
    state = make_state()
    train_steps(state, 2)
    state.finish_epoch()
    assert (state.epoch, state.samples_in_epoch, state.batches_done(3)) == (1, 0, 0)
    assert state.epoch_sums.abs().sum() == 0 and state.step == 2


def test_resume_refuses_another_world_size_or_batch_size():
    state = make_state(world_size=2)
    train_steps(state, 3)
    saved = state.state_dict()
    with pytest.raises(RuntimeError, match="written by 2 ranks but this job has 4"):
        make_state(world_size=4).load_state_dict(saved)
    other = make_state(world_size=2)
    other.load_state_dict(saved)
    with pytest.raises(
        RuntimeError, match="18 samples into epoch 0 is not a whole number of global batches of 8"
    ):
        other.batches_done(4)
