"""Tier 3 reliability: a rank that stops syncing makes the whole job fail within the process-group timeout,
naming the likely cause; Ctrl-C stops every worker and exits 130 in one line; local jobs listen on loopback
only. Restarts and resumes: test_resume.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

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
    # Rank 1 (in eval mode) waits in DDP's allreduce and fails with "Connection closed by peer" once rank 0
    # times out in the layer; the agent may see either exit first. The report leads with rank 0's cause.
    reported = [line for line in proc.stderr.splitlines() if line.startswith("  rank ")]
    assert reported and "Likely cause: another rank did not run this layer in training mode" in reported[0], (
        proc.stderr[-3000:]
    )
    assert "SIGABRT" not in proc.stderr  # no process abort from gloo pairing mismatched collectives
    assert elapsed < 60, f"took {elapsed:.0f}s with a 6s timeout"


def _failed_attempt(tmp_path: Path, errors: dict[int, tuple[str, float]]) -> Path:
    """An attempt directory as the agent leaves it: <attempt>/<local rank>/error.json, written at the
    given times (seconds after an arbitrary start)."""
    attempt = tmp_path / "elastic" / "run_x" / "attempt_0"
    for local_rank, (message, at) in errors.items():
        path = attempt / str(local_rank) / "error.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"message": {"message": message, "extraInfo": {"timestamp": "0"}}}))
        os.utime(path, (1_000_000 + at, 1_000_000 + at))
    return attempt


def test_failure_report_leads_with_the_rank_that_failed_first(tmp_path, capsys):
    """The agent reports the worker it saw exit first (here node 1's local rank 1, global rank 3); the
    report adds the ranks that recorded an error before it, oldest first, and says which failed first."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from launch.agent import _report_failure

    attempt = _failed_attempt(
        tmp_path,
        {
            0: ("RuntimeError: SyncBatchNorm: all-reduce timed out. Likely cause: ...", 1.0),
            1: ("RuntimeError: Connection closed by peer [10.0.0.1]:29500", 1.5),
        },
    )
    (attempt / "2").mkdir()  # a worker killed by a signal records nothing
    seen = ProcessFailure(local_rank=1, pid=1, exitcode=1, error_file=str(attempt / "1" / "error.json"))
    _report_failure(ChildFailedError("run_worker", {3: seen}), tmp_path, timeout_s=30)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"error: 2 worker(s) failed; run directory {tmp_path}; rank 2 failed first"
    assert lines[1].startswith("  rank 2 (error recorded): RuntimeError: SyncBatchNorm: all-reduce timed out")
    assert lines[2] == f"    traceback: {attempt / '0' / 'error.json'}"
    assert lines[3].startswith("  rank 3 (exit code 1): RuntimeError: Connection closed by peer")
    assert lines[4] == f"    traceback: {attempt / '1' / 'error.json'}"
    assert lines[5].startswith("hint: a collective waited up to timeout_s=30 s")


def test_failure_report_of_one_rank_killed_by_a_signal_names_its_log(tmp_path, capsys):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from launch.agent import _report_failure

    missing = tmp_path / "elastic" / "run_x" / "attempt_0" / "0" / "error.json"
    killed = ProcessFailure(local_rank=0, pid=1, exitcode=-9, error_file=str(missing))
    _report_failure(ChildFailedError("run_worker", {0: killed}), tmp_path)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"error: 1 worker(s) failed; run directory {tmp_path}"
    assert lines[1].startswith("  rank 0 (exit code -9): ")
    assert lines[2] == f"    log: {tmp_path / 'logs' / 'rank0.log'}"
    assert len(lines) == 3


def test_worker_records_its_error_before_closing_its_connections(tmp_path, monkeypatch):
    """A failed task's error file exists by the time teardown() closes the process group, so a peer's
    "connection closed" (and the agent stopping this rank) comes after it."""
    from launch import worker

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    seen_at_teardown: list[dict] = []

    def fail(ctx):
        raise RuntimeError("SyncBatchNorm: all-reduce of 37 statistics failed on rank 0 of 2")

    def teardown():
        seen_at_teardown.append(json.loads(error_file.read_text()))

    monkeypatch.setattr(worker, "TASKS", {"fails": fail})
    monkeypatch.setattr(worker, "_job", lambda cfg, run_dir: "token")
    monkeypatch.setattr(worker, "setup", lambda cfg, run_dir: SimpleNamespace())
    monkeypatch.setattr(worker, "teardown", teardown)
    with pytest.raises(RuntimeError, match="37 statistics"):
        worker.run_worker({"task": {"name": "fails"}}, str(tmp_path))
    [record] = seen_at_teardown
    assert record["message"]["message"] == (
        "RuntimeError: SyncBatchNorm: all-reduce of 37 statistics failed on rank 0 of 2"
    )
    assert "in fail" in record["message"]["extraInfo"]["py_callstack"]


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
