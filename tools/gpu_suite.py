"""make test-gpu: every check that needs a GPU, as one command; results and logs under docs/gpu/.

    make test-gpu                              # every step, on python3's own CUDA torch
    make test-gpu ARGS="--list"                # the steps this machine would run, and why some skip
    make test-gpu ARGS="--only main-job,bench-gloo"

Steps: the `-m gpu` tests; equivalence and error tests on W ranks sharing one GPU over gloo with CUDA
tensors; NCCL (one rank on one GPU; W >= 2 when there are GPUs for it); the main job, task=check and
task=bench on CUDA (bench adds torch.nn.SyncBatchNorm and kernel counts). Each step's verdict, time and
key figures go to docs/gpu/results.json (merged, so --only runs add up), its output to docs/gpu/test-gpu.log
and its run directory's files to docs/gpu/<step>/. Exit 0 if every step passed or skipped, 1 if one
failed, 2 at once when there is no CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tools import gpu_needs, gpu_runner
from tools.gpu_runner import Step

ROOT = gpu_needs.ROOT
RUN = [sys.executable, "-m", "launch.run"]
PYTEST = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider"]
EQUIVALENCE = ["tests/test_sync_equivalence.py"]
ERRORS = ["tests/test_sync_errors.py"]
# Errors over NCCL from ranks that never set their CUDA device (the rest of ERRORS runs on gloo with CUDA)
NCCL_ERRORS = ["tests/test_sync_errors.py::test_errors_over_nccl_without_set_device"]


def torch_or_exit() -> Any:
    """The machine's torch when it sees a GPU; otherwise one line on stderr and exit 2."""
    where = f"python {sys.version.split()[0]} at {sys.executable}"
    try:
        import torch
    except ImportError as e:
        sys.exit(_no_gpu(f"cannot import torch in {where} ({e}); set PYTHON= to a Python with CUDA torch"))
    if not torch.cuda.is_available():
        sys.exit(
            _no_gpu(
                f"torch {torch.__version__} in {where} sees no CUDA device (torch.cuda.is_available() is "
                "False); run it on a GPU machine"
            )
        )
    return torch


def _no_gpu(why: str) -> int:
    print(f"error: make test-gpu needs a CUDA GPU: {why}", file=sys.stderr)
    return 2


def environment(torch) -> dict[str, Any]:
    """What the figures were measured on."""
    import platform

    from launch.bench_cuda import device_info

    try:  # a copy of the checkout without .git, or a machine without git, has no commit to name
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        **device_info(torch.device("cuda", 0)),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "git_commit": commit.strip() or None,
    }


def compile_key(job: list[str]) -> str | None:
    """The dotted key that turns on torch.compile for ``job``'s config, if this checkout has one."""
    from launch.config import compose

    cfg = compose(job)
    for path in ("train.compile", "task.compile", "compile"):
        node: Any = cfg
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return path
    return None


def plan(gpus: int, compile_for: dict[str, str | None]) -> list[Step]:
    """Every step, with the reason it skips on a machine with ``gpus`` GPUs."""
    two = None if gpus >= 2 else f"skipped: NCCL needs a GPU per rank, this machine has {gpus}"
    cuda, nccl = {"SYNCBN_TEST_DEVICE": "cuda"}, {"SYNCBN_TEST_DEVICE": "cuda", "SYNCBN_TEST_BACKEND": "nccl"}
    main, check = ["device=cuda", "backend=gloo", "launcher.nproc_per_node=2"], ["task=check", "device=cuda"]
    smoke = ["device=cuda", "launcher.nproc_per_node=1", "experiment=smoke"]
    steps = [
        Step("gpu-tests", [*PYTEST, "-m", "gpu", "tests"]),
        Step("equivalence-gloo-cuda", [*PYTEST, *EQUIVALENCE, *ERRORS], env=cuda),
        Step("equivalence-nccl", [*PYTEST, *EQUIVALENCE, *NCCL_ERRORS], skip=two, env=nccl),
        Step("launcher-nccl-w1", [*RUN, *smoke], expect="summary.json"),
        Step("check-nccl-w1", [*RUN, *check, "launcher.nproc_per_node=1"], expect="check.json"),
        Step("main-job", [*RUN, *main], expect="summary.json"),
        Step("check-gloo", [*RUN, *check, "backend=gloo"], expect="check.json"),
        Step("main-job-nccl", [*RUN, "device=cuda"], skip=two, expect="summary.json"),
        Step("check-nccl", [*RUN, *check], skip=two, expect="check.json"),
    ]
    for name, job, expect in (
        ("main-job", main, "summary.json"),
        ("check-gloo", [*check, "backend=gloo"], "check.json"),
    ):
        key = compile_for.get(name)
        reason = None if key else "skipped: this checkout's config has no task.compile key"
        steps.append(
            Step(f"{name}-compile", [*RUN, *job, f"{key or 'task.compile'}=true"], skip=reason, expect=expect)
        )
    bench = [*RUN, "task=bench", "device=cuda", "timeout_s=3600"]
    return [
        *steps,
        Step("bench-gloo", [*bench, "backend=gloo", "launcher.nproc_per_node=2"], 1800, expect="bench.json"),
        Step("bench-nccl", [*bench, f"launcher.nproc_per_node={min(gpus, 4)}"], 1800, two, "bench.json"),
    ]


def step_env(site: Path | None) -> dict[str, str]:
    """The environment of every step: the installed needs and the checkout on the import path."""
    env = dict(os.environ)
    paths = [str(site)] if site else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run every GPU check; results under docs/gpu/")
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    parser.add_argument("--only", default="", help="comma-separated step names")
    args = parser.parse_args(argv)
    torch = torch_or_exit()  # first: without CUDA, stop at once
    try:
        site = gpu_needs.install(print)
    except gpu_needs.SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.path.insert(0, str(ROOT))
    from launch.config import ConfigError

    try:
        compile_for = {
            "main-job": compile_key(["device=cuda", "backend=gloo"]),
            "check-gloo": compile_key(["task=check", "device=cuda", "backend=gloo"]),
        }
    except ConfigError as e:  # the checkout's own config does not compose: no launcher step could run
        print(f"error: {e}", file=sys.stderr)
        return 1
    steps = plan(torch.cuda.device_count(), compile_for)
    wanted = [name for name in args.only.split(",") if name]
    unknown = sorted(set(wanted) - {s.name for s in steps})
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; the steps: {', '.join(s.name for s in steps)}")
    if args.list:
        for step in steps:
            print(f"{step.name:24} {step.skip or gpu_runner.shown(step)}")
        return 0
    return gpu_runner.run_all(
        [s for s in steps if not wanted or s.name in wanted], environment(torch), step_env(site)
    )


if __name__ == "__main__":
    sys.exit(main())
