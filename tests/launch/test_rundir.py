"""Run-directory claims (launch/rundir.py): a job writes only into a directory it claimed; another job's
directory is refused in one line (or, for a name made from the clock, the next free name is taken); the
nodes of one job share theirs; only an explicit resume takes a directory over."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
from pathlib import Path

import pytest

from launch import rundir
from launch.config import ConfigError


def marker(path: Path) -> dict:
    return json.loads((path / rundir.MARKER).read_text())


def test_new_and_empty_directories_are_claimed(tmp_path):
    first = rundir.claim(tmp_path / "a" / "b", None, resume=False)
    assert first.run_dir == tmp_path / "a" / "b"
    assert marker(first.run_dir)["token"] == first.token and marker(first.run_dir)["state"] == "running"
    (tmp_path / "empty").mkdir()
    assert rundir.claim(tmp_path / "empty", None, resume=False).run_dir == tmp_path / "empty"
    assert [p.name for p in (tmp_path / "empty").iterdir()] == [rundir.MARKER]  # no temporary file left


def test_another_jobs_directory_is_refused_in_one_line(tmp_path):
    first = rundir.claim(tmp_path / "run", None, resume=False)
    rundir.finish(first)
    assert marker(tmp_path / "run")["state"] == "finished"
    with pytest.raises(ConfigError) as info:
        rundir.claim(tmp_path / "run", None, resume=False)
    message = str(info.value)
    assert "belongs to another job" in message and "task.resume=true" in message and "\n" not in message
    assert marker(tmp_path / "run")["token"] == first.token  # the refused job changed nothing


def test_a_directory_with_files_but_no_marker_is_refused(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"already holds files of another run \(metrics.jsonl\)"):
        rundir.claim(tmp_path, None, resume=False)
    assert not (tmp_path / rundir.MARKER).exists()
    assert rundir.claim(tmp_path, None, resume=True).run_dir == tmp_path  # an explicit resume may


def test_an_explicit_resume_takes_over_unless_the_owner_still_runs(tmp_path):
    first = rundir.claim(tmp_path, None, resume=False)
    rundir.finish(first)
    second = rundir.claim(tmp_path, None, resume=True)
    assert second.token != first.token and marker(tmp_path)["state"] == "running"
    # A job that is still running on this machine (here: the test's parent process) keeps its directory.
    owner = marker(tmp_path) | {"pid": os.getppid(), "host": socket.gethostname()}
    (tmp_path / rundir.MARKER).write_text(json.dumps(owner))
    with pytest.raises(ConfigError, match=f"is in use by a running job \\(pid {os.getppid()} "):
        rundir.claim(tmp_path, None, resume=True)


def test_nodes_of_one_job_share_the_directory(tmp_path):
    node0 = rundir.claim(tmp_path, "exp1@head:29400", resume=False)
    node1 = rundir.claim(tmp_path, "exp1@head:29400", resume=False)
    assert node1.token == node0.token  # one job: its checkpoints resume on either node
    with pytest.raises(ConfigError, match="belongs to another job"):
        rundir.claim(tmp_path, "exp2@head:29400", resume=False)
    rundir.finish(node0)
    with pytest.raises(ConfigError, match="finished"):  # the same id once more is a new job
        rundir.claim(tmp_path, "exp1@head:29400", resume=False)


def _finish_after(barrier, claimed, errors) -> None:
    barrier.wait()
    try:
        for _ in range(50):
            rundir.finish(claimed)
    except OSError as e:
        errors.put(repr(e))
    errors.put("done")


def test_nodes_of_one_job_finishing_together_both_succeed(tmp_path):
    """The nodes of a job share its token and end together: their marker writes must not collide."""
    nodes = [rundir.claim(tmp_path, "exp1@head:29400", resume=False) for _ in range(4)]
    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(len(nodes)), ctx.Queue()
    procs = [ctx.Process(target=_finish_after, args=(barrier, n, errors)) for n in nodes]
    for p in procs:
        p.start()
    got = [errors.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert got == ["done"] * len(nodes)
    assert marker(tmp_path)["state"] == "finished"
    assert [p.name for p in tmp_path.iterdir()] == [rundir.MARKER]  # no temporary file left


def test_a_name_from_the_clock_moves_on_to_the_next_free_one(tmp_path):
    names = [rundir.claim(tmp_path / "12-00-00-train", None, resume=False, renumber=True) for _ in range(3)]
    assert [c.run_dir.name for c in names] == ["12-00-00-train", "12-00-00-train-2", "12-00-00-train-3"]


def _claim_after(barrier, path: str, renumber: bool, results) -> None:
    barrier.wait()
    try:
        results.put(str(rundir.claim(Path(path), None, resume=False, renumber=renumber).run_dir))
    except ConfigError as e:
        results.put(f"refused: {e}")


@pytest.mark.parametrize("renumber", [True, False])
def test_jobs_claiming_at_the_same_moment_never_share(tmp_path, renumber):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    args = (barrier, str(tmp_path / "run"), renumber, results)
    procs = [ctx.Process(target=_claim_after, args=args) for _ in range(6)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    claimed = [g for g in got if not g.startswith("refused")]
    if renumber:
        assert len(set(claimed)) == 6  # six jobs, six directories
    else:
        assert len(claimed) == 1 and all("run directory" in g for g in got if g.startswith("refused"))


def test_prepare_claims_before_hydra_and_checks_a_resume_first(tmp_path):
    clock = [f"launcher.run_dir={tmp_path}/same-${{now:%Y}}"]
    first, override = rundir.prepare(clock, multirun=False)
    second, _ = rundir.prepare(clock, multirun=False)
    assert override == f"hydra.run.dir='{first.run_dir}'"
    assert second.run_dir == first.run_dir.with_name(first.run_dir.name + "-2")
    fixed = [f"hydra.run.dir={tmp_path}/fixed"]
    rundir.prepare(fixed, multirun=False)
    with pytest.raises(ConfigError, match="fixed belongs to another job"):
        rundir.prepare(fixed, multirun=False)
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match=r"task\.resume=true but there is no checkpoint"):
        rundir.prepare([f"hydra.run.dir={missing}", "task.resume=true"], multirun=False)
    assert not missing.exists()
    sweep, override = rundir.prepare([f"hydra.sweep.dir={tmp_path}/sweep", "norm=bn,syncbn"], multirun=True)
    assert override == f"hydra.sweep.dir='{tmp_path}/sweep'" and (sweep.run_dir / rundir.MARKER).exists()
