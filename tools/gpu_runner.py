"""How make test-gpu runs one step and records it: output log, verdict, figures, docs/gpu/results.json.

A launcher step passes when it exits 0 and its run directory says the job ran on CUDA and passed (a
summary with steps, check.json passed, bench rows); a pytest step when pytest exits 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "gpu"
# What a launcher step's run directory holds that is worth keeping next to its verdict.
ARTIFACTS = ["config.yaml", "summary.json", "metrics.jsonl", "curves.png", "check.json", "bench.json"]
ARTIFACTS += ["bench.csv", "bench.png"]


@dataclass
class Step:
    name: str
    command: list[str]
    timeout: float = 900.0
    skip: str | None = None  # why this machine does not run it
    expect: str | None = None  # the run-directory file that must say the job passed
    env: dict[str, str] = field(default_factory=dict)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def shown(step: Step) -> str:
    """The step's command as a user would type it."""
    words = ["python" if w == sys.executable else w for w in step.command]
    return " ".join([*(f"{k}={v}" for k, v in step.env.items()), *words])


def _run(step: Step, env: dict[str, str], log: Path) -> int | None:
    """Run the step's command with its output in ``log``; None if it ran past its timeout (then killed)."""
    with open(log, "w") as out:
        out.write(f"$ {shown(step)}\n")
        out.flush()
        # A session of its own, so a timeout can end the elastic agent's workers with it.
        proc = subprocess.Popen(
            step.command,
            cwd=ROOT,
            env={**env, **step.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=step.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.write(f"\n[killed after {step.timeout:.0f} s]\n")
            return None


def _verdict(step: Step, output: str, folder: Path) -> tuple[bool, dict[str, Any]]:
    """Whether the job's run directory says it passed on CUDA, and its figures; its files go to ``folder``."""
    runs = [line.split(":", 1)[1].strip() for line in output.splitlines() if line.startswith("outputs:")]
    run_dir = ROOT / runs[-1] if runs else None  # Hydra prints it absolute; relative is to the checkout
    if run_dir is None or not (run_dir / step.expect).is_file():
        return False, {"why": f"no {step.expect} in a run directory (no 'outputs:' line)"}
    for name in ARTIFACTS:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, folder / name)
    data = json.loads((run_dir / step.expect).read_text())
    keys = {
        "summary.json": ["final_accuracy", "best_accuracy", "steps", "seconds", "world_size", "backend"],
        "check.json": ["passed", "max_error", "tolerance", "allreduce_latency_us", "world_size", "backend"],
        "bench.json": ["gpu", "backend", "world_sizes_skipped"],
    }[step.expect]
    figures = {"run_dir": _rel(run_dir)}
    figures |= {k: data.get(k) for k in keys}
    why = [] if data.get("device") == "cuda" else [f"ran on {data.get('device')}, not cuda"]
    if step.expect == "summary.json" and not data.get("steps"):
        why.append("no training step")
    elif step.expect == "check.json" and data.get("passed") is not True:
        why.append("check did not pass")
    elif step.expect == "bench.json":
        figures["rows"] = len(data.get("rows", []))
        why += [] if figures["rows"] else ["no bench rows"]
    if why:
        figures["why"] = "; ".join(why)
    return not why, figures


def run_step(step: Step, env: dict[str, str]) -> dict[str, Any]:
    """Run one step; its record for results.json."""
    record: dict[str, Any] = {"command": shown(step)}
    if step.skip:
        return {**record, "status": "skipped", "reason": step.skip}
    folder = DOCS / step.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.monotonic()
    code = _run(step, env, folder / "output.log")
    output = (folder / "output.log").read_text(errors="replace")
    record["seconds"] = round(time.monotonic() - started, 1)
    record["exit_code"] = code
    ok = code == 0
    if step.expect is not None and ok:
        ok, record["figures"] = _verdict(step, output, folder)
    elif step.expect is None:  # pytest: its closing line
        lines = [line for line in output.splitlines() if line.strip()]
        record["summary"] = lines[-1] if lines else ""
    record["status"] = "passed" if ok else "failed"
    record["log"] = _rel(folder / "output.log")
    return record


def write_results(results: dict[str, Any]) -> None:
    """docs/gpu/results.json, and test-gpu.log: the same as lines a person reads."""
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    env = results["environment"]
    lines = [f"make test-gpu on {', '.join(env['gpus'])}: torch {env['torch']}, CUDA {env['cuda']}, "]
    lines[0] += f"cuDNN {env['cudnn']}, NCCL {env['nccl']}, Python {env['python']}, {env['date']}"
    for name, rec in results["steps"].items():
        detail = rec.get("reason") or rec.get("summary") or json.dumps(rec.get("figures", {}))
        took = f"{rec['seconds']:7.1f} s" if "seconds" in rec else " " * 9
        lines.append(f"{rec['status']:8} {took}  {name:24} {rec['command']}\n{'':44}{detail}")
    (DOCS / "test-gpu.log").write_text("\n".join(lines) + "\n")


def run_all(steps: list[Step], environment: dict[str, Any], env: dict[str, str]) -> int:
    """Run ``steps`` in order, saving the results after each; 1 if any failed."""
    path = DOCS / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"steps": {}}
    results["environment"] = environment
    for i, step in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {step.name}: {step.skip or shown(step)}", flush=True)
        record = run_step(step, env)
        on = {k: environment[k] for k in ("date", "gpus", "torch")}  # --only runs add up across machines
        results["steps"][step.name] = {**record, **on}
        results["passed"] = all(r["status"] != "failed" for r in results["steps"].values())
        write_results(results)
        print(f"    {record['status']}" + (f" in {record['seconds']} s" if "seconds" in record else ""))
    failed = [s.name for s in steps if results["steps"][s.name]["status"] == "failed"]
    print(f"{len(steps) - len(failed)} of {len(steps)} steps passed or skipped; failed: {failed or 'none'}")
    print(f"results: {_rel(path)}, {_rel(DOCS / 'test-gpu.log')}")
    return 1 if failed else 0
