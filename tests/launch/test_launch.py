"""Tier 3: the launcher end to end, as users run it: subprocesses, real elastic agents, loopback only.

Each test starts a whole job (agent + workers, ~5-10 s on 2 cores), so each one checks several things.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from .jobs import ROOT, SMOKE, clean_env, free_port, run

pytestmark = pytest.mark.multiprocess


def test_train_run_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    proc = run(["-m", "launch.run", *SMOKE, f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["task"]["name"] == "train" and config["task"]["epochs"] == 2  # resolved snapshot
    assert config["launcher"]["run_dir"] == str(out)  # the directory the job really wrote to
    assert {p.name for p in (out / "logs").iterdir()} == {"rank0.log", "rank1.log"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["norm"] == "syncbn" and summary["restarts"] == 0
    assert summary["steps"] == rows[-1]["step"] > 0 and 0 <= summary["final_accuracy"] <= 1
    assert summary["seconds"] > 0
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == summary["steps"] and "stem.1.running_mean" in state["model"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # Console: rank 0 only, with the per-epoch lines and the summary table.
    assert "epoch 2/2" in proc.stdout and "test_accuracy" in proc.stdout
    assert "rank 1/2" not in proc.stdout and "rank 1/2" in (out / "logs" / "rank1.log").read_text()


def test_failing_rank_reports_its_exception(tmp_path):
    proc = run(
        [
            "-m",
            "launch.run",
            *SMOKE,
            "data.train._target_=launch.data.NoSuchDataset",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert proc.returncode == 1
    assert "NoSuchDataset" in proc.stderr and re.search(r"rank \d \(exit code 1\)", proc.stderr)
    # Each failing rank's line is followed by the file that holds its traceback.
    files = re.findall(r"^    traceback: (.+error\.json)$", proc.stderr, re.M)
    assert files and all(Path(f).is_relative_to(tmp_path / "elastic") for f in files), proc.stderr
    assert "NoSuchDataset" in json.loads(Path(files[0]).read_text())["message"]["message"]


# Every way the issue tracker saw a config fail late (types, values, keys, options), and one sweep point.
BAD_CONFIGS = [
    (["task.epochs=abc"], "task.epochs=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["train.epochs=abc"], "train.* is now task.*"),
    (["timeout_s=abc"], "timeout_s=abc: Value 'abc' of type 'str' could not be converted to Float"),
    (["launcher.timeout_s=abc"], "launcher.timeout_s is now timeout_s"),
    (["task.batch_size=0"], "task.batch_size must be >= 1, got 0"),
    (["task.lr=-1"], "task.lr must be >= 0, got -1.0"),
    (["model.widths=[]"], "model.widths must list at least one width, got []"),
    (["seed=abc"], "seed=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["task=check", "task.spatial=[2,2,2,2]"], "task.spatial must hold 0 to 3 sizes"),
    (["task.fault.kind=bad"], "Invalid value 'bad', expected one of [kill, eval]"),
    (["task.fault.kind=kill", "task.fault.rank=2"], "task.fault.rank=2 is not a rank of the 2 ranks"),
    (["task=check", "norm.group_size=3"], "norm.group_size=3 does not divide the world size 2"),
    (["launcher.nproc_per_node=0"], "launcher.nproc_per_node must be >= 1, got 0"),
    (["launcher.max_restarts=-1"], "launcher.max_restarts must be >= 0, got -1"),
    (["launcher.last_call_timeout_s=0.5"], "launcher.last_call_timeout_s must be >= 1, got 0.5"),
    (["no_such_key=1"], "Key 'no_such_key' not in 'Config'"),
    (["task=check", "task.epochs=1"], "Key 'epochs' not in 'CheckTask'"),
    (["norm=nope"], "Could not find 'norm/nope' (options: bn, syncbn)"),
    (["-m", "norm=bn,syncbn", "task.lr=-1"], "task.lr must be >= 0, got -1.0"),
]


@pytest.mark.parametrize(
    ("overrides", "message"), BAD_CONFIGS, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_bad_config_exits_2_with_one_line_and_no_run_directory(overrides, message, tmp_path):
    out = tmp_path / "run"
    proc = run(["-m", "launch.run", *overrides, f"hydra.run.dir={out}", f"hydra.sweep.dir={out}"], timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert not out.exists()  # rejected before Hydra made a directory


def test_refuses_to_run_inside_an_elastic_job(tmp_path):
    env = clean_env() | {"TORCHELASTIC_RUN_ID": "outer"}
    proc = run(["-m", "launch.run", f"hydra.run.dir={tmp_path}"], timeout=60, env=env)
    assert proc.returncode == 2 and "cannot run inside an elastic job" in proc.stderr
    proc = run(["-m", "launch.worker", "task=check"], timeout=60)
    assert proc.returncode != 0 and "torchrun" in proc.stderr


def test_torchrun_runs_the_worker_directly(tmp_path):
    out = tmp_path / "torchrun"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "launch.worker"]
    proc = run([*args, "task=check", f"launcher.run_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "check.json").read_text())
    assert result["passed"] and result["world_size"] == 2 and result["backend"] == "gloo"
    assert yaml.safe_load((out / "config.yaml").read_text())["task"]["name"] == "check"


def test_worker_under_an_external_launcher_rejects_a_bad_config(tmp_path):
    """The same checks as launch.run, against the world size the launcher set; nothing is started."""
    env = clean_env() | {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}
    for overrides, message in [
        (["task=check", "norm.group_size=3"], "norm.group_size=3 does not divide the world size 4"),
        (["task.epochs=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    ]:
        out = tmp_path / "run"
        proc = run(["-m", "launch.worker", *overrides, f"launcher.run_dir={out}"], timeout=60, env=env)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
        assert not out.exists()


def test_two_elastic_agents_form_one_job(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    common = [
        "-m",
        "launch.run",
        "task=check",
        "launcher.nnodes=2",
        "launcher.nproc_per_node=1",
        f"launcher.rdzv_endpoint={endpoint}",
        "launcher.run_id=two-agents",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, *common, f"hydra.run.dir={tmp_path / f'node{i}'}"],
            cwd=ROOT,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=100) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(f.read_text()) for f in tmp_path.glob("node*/check.json")]
    assert len(results) == 1  # written by global rank 0 only
    assert results[0]["passed"] and results[0]["world_size"] == 2


def test_group_size_through_the_launcher(tmp_path):
    proc = run(
        [
            "-m",
            "launch.run",
            "task=check",
            "launcher.nproc_per_node=4",
            "norm.group_size=2",
            "task.spatial=[2,3,2]",  # 3-D input
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["passed"] and result["world_size"] == 4 and result["group_size"] == 2


def test_bench_smoke_writes_its_outputs(tmp_path):
    """Crash test only: timing figures are never asserted in the test suite."""
    proc = run(
        [
            "-m",
            "launch.run",
            "task=bench",
            "task.shapes=[[4,8,4,4],[16,8]]",
            "task.dtypes=[float32,bfloat16]",
            "task.world_sizes=[1,2,4]",
            "task.rounds=2",
            "task.warmup=1",
            "task.compile=false",  # its compiled rows: tests/launch/test_compile_launch.py
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert rows["world_sizes_skipped"] == [4]
    # 2 shapes (one also channels_last) x 2 dtypes x world sizes 1 and 2
    assert len(rows["rows"]) == 12
    header = (tmp_path / "bench.csv").read_text().splitlines()[0].split(",")
    times = {"syncbn", "local", "comm", "exchange", "naive"}
    assert times | {"floor_ratio", "exchange_ratio", "naive_speedup", "saved_MB_syncbn"} <= set(header)
    assert {"syncbn_cpu", "insitu_cpu", "cpu_overhead"} <= set(header)
    for row in rows["rows"]:  # CPU time of the rank process: positive, about at most the wall time
        assert 0 < row["syncbn_cpu"] <= row["syncbn"] * 1.05 + 0.05, row
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "floor_ratio" in proc.stdout
