"""task.compile=true: the main job runs torch.compile'd (README "torch.compile") and learns as eager does."""

from __future__ import annotations

import json
import time

import pytest

from .jobs import run

pytestmark = pytest.mark.multiprocess

# One epoch of 3 steps of 8 synthetic images per rank: the smallest job that trains, evaluates and saves.
TINY = ["experiment=smoke", "data.train.size=48", "data.test.size=24", "task.epochs=1"]


def test_compiled_training_matches_eager(tmp_path):
    rows, seconds = {}, {}
    for name, extra in (("compiled", ["task.compile=true"]), ("eager", [])):
        start = time.monotonic()
        proc = run(["-m", "launch.run", *TINY, *extra, f"hydra.run.dir={tmp_path / name}"], timeout=400)
        seconds[name] = time.monotonic() - start
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows[name] = [
            json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
    (compiled,), (eager,) = rows["compiled"], rows["eager"]
    assert compiled["step"] == eager["step"] == 3
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert abs(compiled[key] - eager[key]) <= 1e-4 * max(1.0, abs(eager[key])), (key, compiled, eager)
    print(f"wall seconds: {seconds}")  # compile time on this machine, for the README (-s shows it)


def test_bench_has_compiled_rows(tmp_path):
    """Crash test of the compiled rows (task.compile, world size 2); timings are never asserted."""
    proc = run(
        [
            "-m",
            "launch.run",
            "task=bench",
            "task.shapes=[[4,8,4,4]]",
            "task.channels_last=false",
            "task.dtypes=[float32,bfloat16]",
            "task.world_sizes=[2]",
            "task.network_images=[2]",
            "task.rounds=2",
            "task.network_rounds=2",
            "task.warmup=1",
            "model.widths=[4]",
            f"hydra.run.dir={tmp_path}",
        ],
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    float32, bfloat16 = result["rows"]
    assert float32["compiled"] > 0 and float32["compile_s"] > 0 and "compiled_speedup" in float32
    assert "compiled" not in bfloat16  # compiled rows are float32 only
    (network,) = result["network"]
    assert network["syncbn_compiled"] > 0 and network["bn_compiled"] > 0 and "compiled_speedup" in network
    assert "under torch.compile" in proc.stdout


def test_check_with_the_layer_compiled_passes(tmp_path):
    """task=check task.compile=true: the compiled layer against float64 BatchNorm, as the eager one is."""
    proc = run(
        ["-m", "launch.run", "task=check", "task.compile=true", f"hydra.run.dir={tmp_path}"], timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["passed"] is True and result["compiled"] is True and result["max_error"] <= 1e-8
    assert "PASSED (layer compiled)" in proc.stdout + proc.stderr
