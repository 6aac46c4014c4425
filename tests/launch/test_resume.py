"""Tier 3 recovery: restarts and resumes continue exactly (at the same or another world size) or are refused
in one line that changes nothing; run directories are never shared by two jobs.

The jobs run as users start them (python -m launch.run / torchrun as subprocesses, loopback only); a
session-wide uninterrupted run is the reference the recovered runs must equal.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

from .jobs import SMOKE, free_port, run, start

pytestmark = pytest.mark.multiprocess

# 128 samples over 2 ranks, 2 per step: 32 steps per epoch, 64 in all.
LONG_SMOKE = ["experiment=smoke", "data.train.size=128", "task.batch_size=2", "task.epochs=2"]
KILL_RANK1_AT_23 = [
    "task.checkpoint_every=5",
    "task.fault.kind=kill",
    "task.fault.rank=1",
    "task.fault.step=23",
]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """LONG_SMOKE, uninterrupted: what every recovered run must end with."""
    out = tmp_path_factory.mktemp("plain") / "run"
    proc = run(["-m", "launch.run", *LONG_SMOKE, f"hydra.run.dir={out}"], timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def epochs_logged(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a = torch.load(a_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(b_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6) for k in a)


def files_of(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``run_dir`` with its bytes and modification time: a refused job must change none."""
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}


def test_killed_worker_restarts_and_resumes_without_losing_a_step(tmp_path, plain_run):
    out = tmp_path / "crashed"
    crashed = run(
        [
            "-m",
            "launch.run",
            *LONG_SMOKE,
            *KILL_RANK1_AT_23,
            "launcher.max_restarts=1",
            f"hydra.run.dir={out}",
        ],
        timeout=150,
    )
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    want, got = summary(plain_run), summary(out)
    assert want["steps"] == got["steps"] == 64 and want["restarts"] == 0
    assert got["restarts"] == 1 and got["resumed_from_steps"] == [20]  # the last checkpoint before step 23
    assert "SIGKILL" in crashed.stderr or "-9" in crashed.stderr
    assert epochs_logged(out) == [1, 2]
    assert_same_weights(plain_run, out)  # same weights and running statistics as the uninterrupted run


def test_resume_true_continues_a_failed_run_exactly(tmp_path, plain_run):
    """A job that gave up (no restarts left) is continued by the same command with task.resume=true."""
    out = tmp_path / "run"
    failed = run(["-m", "launch.run", *LONG_SMOKE, *KILL_RANK1_AT_23, f"hydra.run.dir={out}"], timeout=150)
    assert failed.returncode == 1
    # A rank killed by a signal recorded no exception: the report points at its log instead.
    assert f"log: {out / 'logs' / 'rank1.log'}" in failed.stderr, failed.stderr[-3000:]
    again = run(["-m", "launch.run", *LONG_SMOKE, "task.resume=true", f"hydra.run.dir={out}"], timeout=150)
    assert again.returncode == 0, again.stderr[-3000:]
    got = summary(out)
    assert got["resumed_from_steps"] == [20] and got["steps"] == 64 and epochs_logged(out) == [1, 2]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["lr"] == 0.0  # schedule's end
    assert_same_weights(plain_run, out)


def test_a_refused_resume_changes_nothing_and_says_why_in_one_line(tmp_path, plain_run):
    out = tmp_path / "run"
    shutil.copytree(plain_run, out)
    before = files_of(out)
    changed = ["task.batch_size=4", "data.train.size=100", "task.epochs=3", "seed=1"]
    cases = [
        (
            ["task.resume=true", *changed],
            "(task.batch_size 2 -> 4, data.train size 128 -> 100, task.epochs 2 -> 3, seed 0 -> 1;",
        ),
        ([], "belongs to another job"),  # no resume asked for: the directory is another job's
    ]
    for extra, message in cases:
        proc = run(["-m", "launch.run", *LONG_SMOKE, *extra, f"hydra.run.dir={out}"], timeout=60)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
        assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert files_of(out) == before  # not a byte, not a timestamp: config.yaml included
    # task.resume=true where there is nothing to resume; then a damaged checkpoint, named.
    missing = tmp_path / "missing"
    proc = run(["-m", "launch.run", *LONG_SMOKE, "task.resume=true", f"hydra.run.dir={missing}"], timeout=60)
    assert proc.returncode == 2 and "task.resume=true but there is no checkpoint to resume" in proc.stderr
    assert not missing.exists()
    (out / "checkpoints" / "last.pt").write_bytes(b"\0" * 100)
    proc = run(["-m", "launch.run", *LONG_SMOKE, "task.resume=true", f"hydra.run.dir={out}"], timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert f"cannot read checkpoint {out / 'checkpoints' / 'last.pt'}" in proc.stderr


def test_workers_under_torchrun_refuse_a_damaged_checkpoint_on_every_rank(tmp_path, plain_run):
    """Under an external launcher the workers decide (rank 0 reads, every rank raises the same error)."""
    out = tmp_path / "run"
    shutil.copytree(plain_run, out)
    (out / "checkpoints" / "last.pt").write_bytes(b"garbage" * 20)
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "launch.worker"]
    proc = run([*args, *LONG_SMOKE, "task.resume=true", f"launcher.run_dir={out}"], timeout=150)
    assert proc.returncode != 0
    logs = [(out / "logs" / f"rank{r}.log").read_text() for r in range(2)]
    assert (out / "config.yaml").read_text() == (plain_run / "config.yaml").read_text()  # not rewritten
    assert f"cannot read checkpoint {out / 'checkpoints' / 'last.pt'}" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("CheckpointError: cannot read checkpoint") >= 2  # both ranks raised it
    assert all("resumed from checkpoint" not in log for log in logs)


def test_two_jobs_started_at_once_never_share_a_run_directory(tmp_path):
    """Same second: a name from the clock moves on to <name>-2; a fixed name is refused to the second."""
    smoke = ["-m", "launch.run", *SMOKE]
    clock = f"launcher.run_dir={tmp_path}/clock-${{now:%Y}}"
    fixed = f"hydra.run.dir={tmp_path}/fixed"
    procs = [start([*smoke, clock]) for _ in range(2)] + [start([*smoke, fixed]) for _ in range(2)]
    results = [(p.wait(150), *p.communicate()) for p in procs]
    year = time.strftime("%Y")
    assert [r[0] for r in results[:2]] == [0, 0], results[:2]
    dirs = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("clock"))
    assert dirs == [f"clock-{year}", f"clock-{year}-2"]
    for name in dirs:  # each holds one job's rows, summary and checkpoint
        assert epochs_logged(tmp_path / name) == [1, 2] and summary(tmp_path / name)["steps"] == 6
    codes = sorted(r[0] for r in results[2:])
    refused = next(r[2] for r in results[2:] if r[0] == 2)
    assert codes == [0, 2] and refused.count("\n") == 1, results[2:]
    assert f"run directory {tmp_path / 'fixed'} " in refused and "task.resume=true" in refused
    assert epochs_logged(tmp_path / "fixed") == [1, 2]


def committed_samples(run_dir: Path) -> tuple[dict[int, Counter], set[int]]:
    """Dataset indices per epoch, and the step numbers, of the steps that made it into the final model.

    Each worker process logs its steps (task.log_samples); a step is rolled back when a process that
    started after it was logged resumed from an earlier step (the last checkpoint before a failure).
    """
    logs = [
        [json.loads(line) for line in f.read_text().splitlines()] for f in (run_dir / "samples").iterdir()
    ]
    starts = [(rows[0]["started"], rows[0]["from_step"]) for rows in logs if rows]
    epochs: dict[int, Counter] = defaultdict(Counter)
    steps = set()
    for rows in logs:
        for row in rows:
            rolled_back = any(t > row["time"] and step < row["step"] for t, step in starts)
            if not rolled_back:
                epochs[row["epoch"]].update(row["indices"])
                steps.add(row["step"])
    return epochs, steps


def test_survivor_of_a_lost_node_finishes_the_run_at_world_size_1(tmp_path):
    """Two agents on loopback (nnodes=1:2), one SIGKILLed with its worker mid-epoch: the other re-forms the
    job alone and finishes it from the last checkpoint, every sample of every epoch trained on once."""
    out, size, batch = tmp_path / "run", 96, 4
    common = [
        "-m",
        "launch.run",
        "experiment=smoke",
        f"data.train.size={size}",
        f"task.batch_size={batch}",
        "task.epochs=2",
        "task.checkpoint_every=2",
        "task.log_samples=true",
        "launcher.nnodes=1:2",
        "launcher.nproc_per_node=1",
        f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}",
        "launcher.run_id=scale-down",
        "launcher.max_restarts=1",
        "launcher.last_call_timeout_s=3",
        f"hydra.run.dir={out}",
    ]
    # The node that will be lost starts first: it waits for the head's store, so both join one round.
    lost = start([*common, "launcher.is_host=false"], start_new_session=True)
    head = start([*common, "launcher.is_host=true"], start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not _trained_at(out, world_size=2):
            time.sleep(0.05)
        assert _trained_at(out, world_size=2), "the two nodes did not get to train together"
        os.killpg(lost.pid, signal.SIGKILL)  # the node is gone: its agent and its worker
        _, err = head.communicate(timeout=240)
    finally:
        for proc in (lost, head):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
    assert head.returncode == 0, err[-3000:]
    got = summary(out)
    assert got["world_size"] == 1 and got["world_sizes"][-2:] == [2, 1] and got["restarts"] >= 1
    resumed = got["resumed_from_steps"][-1]
    assert 0 < resumed < size // (2 * batch)  # from a checkpoint inside the first epoch
    epochs, steps = committed_samples(out)
    assert sorted(epochs) == [0, 1] and steps == set(range(1, got["steps"] + 1))
    for epoch, counts in epochs.items():
        assert set(counts) == set(range(size)), f"epoch {epoch} skipped {set(range(size)) - set(counts)}"
        assert sum(counts.values()) - size <= 2 * batch, f"epoch {epoch} repeated {counts.most_common(3)}"
    # The rest of the run at world size 1: batches of 4 instead of 8 global samples.
    assert got["steps"] == resumed + math.ceil((size - resumed * 2 * batch) / batch) + size // batch
    assert epochs_logged(out) == [1, 2]


def _trained_at(run_dir: Path, world_size: int) -> bool:
    """A checkpoint exists and some worker logged a step at ``world_size``."""
    if not (run_dir / "checkpoints" / "last.pt").exists() or not (run_dir / "samples").is_dir():
        return False
    for log in (run_dir / "samples").iterdir():
        lines = log.read_text().splitlines()
        if lines and json.loads(lines[0])["world_size"] == world_size:
            return True
    return False
