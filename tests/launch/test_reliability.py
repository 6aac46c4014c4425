"""Tier 3 reliability: a rank that stops syncing makes the whole job fail within the process-group timeout,
naming the likely cause; Ctrl-C stops every worker and exits 130 in one line; local jobs listen on loopback
only. Restarts and resumes: test_resume.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .jobs import ROOT, clean_env, run, start

pytestmark = pytest.mark.multiprocess

# 256 samples over 2 ranks, 2 per step: 64 steps per epoch, 128 in all.
LONG_SMOKE = ["experiment=smoke", "data.train.size=256", "task.batch_size=2", "task.epochs=2"]


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


def test_ctrl_c_stops_every_worker_and_exits_130_with_one_line(tmp_path):
    """SIGINT to the launcher only (as `kill -INT`); a terminal's Ctrl-C also reaches the workers."""
    args = ["-m", "launch.run", *LONG_SMOKE, "task.epochs=30", "task.checkpoint_every=5"]
    proc = start([*args, f"hydra.run.dir={tmp_path}"])
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (tmp_path / "checkpoints" / "last.pt").exists():
            time.sleep(0.2)
        assert (tmp_path / "checkpoints" / "last.pt").exists(), "the job did not get to train"
        workers = _tree(proc.pid) - {proc.pid}
        assert len(workers) >= 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert err == f"interrupted by SIGINT: all workers stopped; run directory {tmp_path}\n"
    deadline = time.monotonic() + 10  # the agent waited for its workers; allow their reaping a moment
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.2)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]
