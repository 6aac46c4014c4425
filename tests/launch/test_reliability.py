"""Tier 3 reliability: a SIGKILLed worker is restarted and resumes without losing a step; a rank that stops
syncing makes the whole job fail within the process-group timeout, naming the likely cause; local jobs
listen on loopback only.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .jobs import ROOT, SMOKE, clean_env, run

pytestmark = pytest.mark.multiprocess

# 256 samples over 2 ranks, 2 per step: 64 steps per epoch, 128 in all.
LONG_SMOKE = ["experiment=smoke", "data.train.size=256", "task.batch_size=2", "task.epochs=2"]


def test_killed_worker_restarts_and_resumes_without_losing_a_step(tmp_path):
    plain = run(["-m", "launch.run", *LONG_SMOKE, f"hydra.run.dir={tmp_path / 'plain'}"], timeout=150)
    assert plain.returncode == 0, plain.stderr[-3000:]
    crashed = run(
        [
            "-m",
            "launch.run",
            *LONG_SMOKE,
            "task.checkpoint_every=5",
            "launcher.max_restarts=1",
            "task.fault.kind=kill",
            "task.fault.rank=1",
            "task.fault.step=23",
            f"hydra.run.dir={tmp_path / 'crashed'}",
        ],
        timeout=150,
    )
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    want = json.loads((tmp_path / "plain" / "summary.json").read_text())
    got = json.loads((tmp_path / "crashed" / "summary.json").read_text())
    assert want["steps"] == got["steps"] == 128 and want["restarts"] == 0
    assert got["restarts"] == 1 and got["resumed_from_steps"] == [20]  # the last checkpoint before step 23
    assert "SIGKILL" in crashed.stderr or "-9" in crashed.stderr
    rows = [
        json.loads(line)["epoch"]
        for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows == [1, 2]
    # Resuming is exact: same weights and running statistics as the run that never crashed.
    a = torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "crashed" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6) for k in a)


def test_rank_that_stops_syncing_fails_the_job_within_the_timeout(tmp_path):
    start = time.monotonic()
    proc = run(
        [
            "-m",
            "launch.run",
            *LONG_SMOKE,
            "timeout_s=6",
            "task.fault.kind=eval",
            "task.fault.step=5",
            f"hydra.run.dir={tmp_path}",
        ],
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == 1
    assert "Likely cause: another rank did not run this layer in training mode" in proc.stderr
    assert "SIGABRT" not in proc.stderr  # no process abort from gloo pairing mismatched collectives
    assert elapsed < 60, f"took {elapsed:.0f}s with a 6s timeout"


def _listening(pids: set[int]) -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return [line.split()[3] for line in out.splitlines() if any(f"pid={p}," in line for p in pids)]


def _tree(pid: int) -> set[int]:
    found, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
            found.add(int(child))
            frontier.append(int(child))
    return found


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.exists("/usr/bin/ss"), reason="needs ss"
)
def test_local_job_listens_on_loopback_only(tmp_path):
    secret = "s3cr3t-value-that-must-not-be-logged"
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.run", *LONG_SMOKE, "task.epochs=30", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env=clean_env() | {"MY_API_TOKEN": secret},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        addresses: set[str] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "metrics.jsonl").exists():
            with contextlib.suppress(FileNotFoundError):  # a process ended between listing and reading
                addresses |= set(_listening(_tree(proc.pid)))
            time.sleep(0.5)
        assert (tmp_path / "metrics.jsonl").exists(), "the job did not get to train"
        addresses |= set(_listening(_tree(proc.pid)))
    finally:
        proc.kill()
        proc.wait(10)
    assert len(addresses) >= 2, addresses  # the agent's stores and gloo's listeners were seen
    assert all(a.startswith(("127.", "[::1]")) for a in addresses), addresses
    # Nothing the job wrote (logs, config snapshot, elastic logs) carries the environment.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_resume_true_continues_where_the_last_run_stopped(tmp_path):
    """task.resume=true in a reused run directory: the epochs already done are not trained again."""
    smoke = [o for o in SMOKE if not o.startswith("task.epochs=")]
    first = run(["-m", "launch.run", *smoke, "task.epochs=1", f"hydra.run.dir={tmp_path}"])
    assert first.returncode == 0, first.stderr[-3000:]
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    again = run(
        ["-m", "launch.run", *SMOKE, "task.epochs=2", "task.resume=true", f"hydra.run.dir={tmp_path}"]
    )
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from_steps"] == [steps] and summary["steps"] == 2 * steps
    assert "resumed from checkpoint at step" in (tmp_path / "logs" / "rank1.log").read_text()
    rows = [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2]
