"""TrainState and the resume rules (launch/checkpoint.py): what a checkpoint holds, written and read under the
same keys; which changed settings a resume refuses, in one line; unreadable files named."""

from __future__ import annotations

import io

import pytest
import torch

from launch.checkpoint import CheckpointError, TrainState, check_compatible, load, resumable, run_record
from launch.config import ConfigError

CFG = {"task": {"batch_size": 3, "epochs": 2}, "seed": 0}


def make_state(world_size: int = 2, lr: float = 0.1, dataset_size: int = 30) -> TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    return TrainState(model, opt, run_record(CFG, world_size, dataset_size), torch.device("cpu"))


def train_steps(state: TrainState, steps: int, batch_size: int = 3) -> None:
    for _ in range(steps):
        x, y = torch.randn(batch_size, 4), torch.randint(0, 3, (batch_size,))
        logits = state.model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.record_batch(loss, logits, y)


def test_state_dict_round_trip_restores_everything():
    state = make_state()
    train_steps(state, 4)
    assert state.step == 4 and state.samples_in_epoch == 4 * 3 * 2  # global samples: batch x world size
    assert state.epoch_sums[2].item() == 12  # this rank's samples
    saved = state.state_dict()
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # what resume reads: plain tensors and numbers only

    fresh = make_state(world_size=1, lr=0.5)  # another world size: nothing in the state depends on it
    fresh.load_state_dict(loaded)
    assert set(loaded) == set(fresh.state_dict())  # the keys it writes are the keys it reads
    for key, value in fresh.model.state_dict().items():
        assert torch.equal(value, saved["model"][key]), key
    assert fresh.optimizer.param_groups[0]["lr"] == 0.1
    assert (fresh.step, fresh.epoch, fresh.samples_in_epoch) == (4, 0, 24)
    assert fresh.run["world_size"] == 1 and saved["run"]["world_size"] == 2  # the record stays this run's
    assert fresh.seconds == saved["seconds"] and fresh.elapsed() >= saved["seconds"]
    assert torch.equal(fresh.epoch_sums, state.epoch_sums)
    # The same data and RNG from here on give the same weights.
    torch.manual_seed(1)
    train_steps(state, 2)
    torch.manual_seed(1)
    train_steps(fresh, 2)
    for a, b in zip(state.model.parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_progress_counts_samples_not_steps():
    """The learning-rate clock: the same fraction of the run whatever world size consumed the samples."""
    state = make_state(world_size=2, dataset_size=30)  # 2 epochs of 30 samples
    train_steps(state, 2)  # 12 samples
    assert state.progress() == pytest.approx(12 / 60)
    other = make_state(world_size=1, dataset_size=30)
    train_steps(other, 4)  # 12 samples at world size 1
    assert other.progress() == state.progress()
    train_steps(state, 4)  # 36 > 30: the epoch's last step pads; progress stops at the epoch's end
    assert state.progress() == pytest.approx(0.5)
    state.finish_epoch()
    assert (state.epoch, state.samples_in_epoch, state.progress()) == (1, 0, 0.5)
    assert state.epoch_sums.abs().sum() == 0 and state.step == 6


def test_resume_refuses_changed_settings_in_one_line_naming_them(tmp_path):
    saved = run_record(CFG, 2, 30)
    check_compatible(tmp_path / "last.pt", saved, run_record(CFG, 1, 30))  # a world size change continues
    changed = {"task": {"batch_size": 4, "epochs": 3}, "seed": 0}
    with pytest.raises(ConfigError) as info:
        check_compatible(tmp_path / "last.pt", saved, run_record(changed, 2, 31))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "last.pt") in message
    assert "task.batch_size 3 -> 4" in message and "task.epochs 2 -> 3" in message
    assert "data.train size 30 -> 31" in message and "seed" not in message.split("(")[1]
    with pytest.raises(ConfigError, match="records no batch size"):
        check_compatible(tmp_path / "last.pt", None, saved)


def test_resume_true_without_a_checkpoint_is_an_error(tmp_path):
    assert resumable(tmp_path, run_record(CFG, 2, 30), explicit=False) is None
    with pytest.raises(ConfigError, match=r"task\.resume=true but there is no checkpoint to resume"):
        resumable(tmp_path, run_record(CFG, 2, 30), explicit=True)


def test_only_the_same_job_resumes_without_being_asked(tmp_path):
    state = make_state()
    (tmp_path / "checkpoints").mkdir()
    torch.save(state.state_dict() | {"job": "job-a"}, tmp_path / "checkpoints" / "last.pt")
    current = run_record(CFG, 1, 30)  # a restart at another world size: still the same run
    assert resumable(tmp_path, current, explicit=False, job="job-a")["job"] == "job-a"
    with pytest.raises(ConfigError, match="holds another job's checkpoint"):
        resumable(tmp_path, current, explicit=False, job="job-b")
    assert resumable(tmp_path, current, explicit=True, job="job-b")["step"] == 0  # asked for: resumes


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (b"not a checkpoint" * 10, "not a torch checkpoint"),
        ("zip", "central directory"),  # a torch file cut short
        ([1, 2, 3], "not a syncbn training checkpoint"),
    ],
    ids=["empty", "garbage", "truncated", "foreign"],
)
def test_unreadable_checkpoint_is_named_in_one_line(tmp_path, content, reason):
    file = tmp_path / "last.pt"
    if content == "zip":
        buffer = io.BytesIO()
        torch.save(make_state().state_dict(), buffer)
        file.write_bytes(buffer.getvalue()[:200])
    elif isinstance(content, bytes):
        file.write_bytes(content)
    else:
        torch.save(content, file)
    with pytest.raises(CheckpointError) as info:
        load(file)
    message = str(info.value)
    assert str(file) in message and reason in message and "\n" not in message
    assert "weights_only" not in message  # torch's advice to unpickle arbitrary code is not ours to give
