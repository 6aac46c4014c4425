"""Every command in the README's bash blocks, as a user types it in a fresh shell.

Commands that run on this machine run verbatim through bash, from the repository root, in an environment
without the test's own settings: `make ...` as is, `python ...`/`torchrun ...` after `. .venv/bin/activate`
(as the README says). Commands that need machines or tools this one lacks (a second host, CUDA, Slurm,
Docker, Kubernetes) are composed and validated with our config instead, or are named with the test that
covers them. A README command missing from the table below fails the test, and so does a stale entry.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from launch.config import compose, fixed_world_size
from launch.validate import validate

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"

# command -> how it is tested: "run" (verbatim, seconds), "slow" (verbatim, a minute or more: CI runs it),
# "compose" (launch.run/launch.worker overrides composed and validated; needs CUDA or other hosts), or the
# reason it cannot run here and what covers it instead.
COMMANDS = {
    "pip install .": "installs into whatever environment is active; the Dockerfile does the same "
    "(`pip install --no-deps .`) and tests/launch/test_recipes.py checks that recipe",
    'pip install ".[launch]"': "as above, with the launcher's dependencies (pinned by constraints.txt)",
    "make install": "run",
    ". .venv/bin/activate": "run",
    "make test": "what CI runs (.ci/run); running it inside the suite would recurse",
    "make run": "slow",
    "make run ARGS=task.compile=true": "slow",
    "make check": "run",
    'make run ARGS="experiment=smoke task.epochs=1"': "run",
    "python -m launch.run experiment=smoke launcher.nproc_per_node=4 norm.group_size=2": "run",
    "python -m launch.run experiment=smoke": "run",
    "python -m launch.run -m experiment=small_batch": "slow",
    "python -m launch.run --cfg job": "run",
    # "Many nodes by hand": tests/launch/test_netns.py (root) runs both verbatim on two network-namespace
    # hosts, placeholders filled in; here they are composed and validated.
    "python -m launch.run launcher=multinode launcher.nnodes=2 launcher.nproc_per_node=2 "
    "launcher.rdzv_endpoint=<head-ip>:<port> launcher.run_id=<id> task=check": "compose",
    "python -m launch.run launcher=multinode launcher.nnodes=2 launcher.nproc_per_node=2 "
    "launcher.rdzv_endpoint=<head-ip>:<port> launcher.run_id=<id> experiment=smoke": "compose",
    "torchrun --standalone --nproc_per_node=2 -m launch.worker task=check": "run",
    "srun torchrun --nnodes=$SLURM_NNODES --nproc_per_node=4 --rdzv-backend=c10d "
    "--rdzv-endpoint=$HEAD:29400 --rdzv-id=$SLURM_JOB_ID -m launch.worker device=cuda": "compose",
    "docker build -f docker/Dockerfile -t syncbn:cpu . "
    "&& docker run --rm --shm-size=1g syncbn:cpu task=check": "compose",
    "docker compose -f docker/compose.yaml up --build": "no Docker engine here; every command in "
    "docker/compose.yaml is composed by tests/launch/test_recipes.py",
    "sbatch docker/slurm/syncbn.sbatch": "no Slurm here; tests/launch/test_recipes.py composes its command",
    "kubectl apply -f docker/k8s/pytorchjob.yaml": "no Kubernetes here; tests/launch/test_recipes.py "
    "composes its args with the env the operator injects",
    "make bench": "slow",
    "make test-gpu": "needs CUDA; without it the command must exit 2 with one line, which "
    "tests/tools/test_gpu_suite.py runs verbatim, with the steps, verdicts and results checked by stand-ins",
    "make gpu-wheels": "downloads from PyPI; tests/tools/test_gpu_suite.py checks its pinned pip commands "
    "(--dry-run, make -n)",
}


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # after whitespace, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if char in "\"'" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            command = " ".join(_strip_comment(line).split())
            if command:
                commands.append(command)
    return commands


def test_every_readme_command_is_covered():
    found = readme_commands()
    assert len(found) == len(set(found))
    missing = [c for c in found if c not in COMMANDS]
    stale = [c for c in COMMANDS if c not in found]
    assert not missing, f"README commands without a test (add them to COMMANDS): {missing}"
    assert not stale, f"COMMANDS entries the README no longer has: {stale}"


def _fresh_env() -> dict:
    """A login shell's environment: no venv active, nothing from pytest, make or a launcher.

    Only the basics a login shell has, plus the network-interface settings a site may export
    (GLOO_*/NCCL_*); `make test ARGS=...` would otherwise hand its ARGS to `make run`.
    """
    keep = ("HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR", "SHELL", "TERM")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith(("GLOO_", "NCCL_"))}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN]
    env["PATH"] = os.pathsep.join(path)
    return env


class ReadmeShell:
    """Runs README lines in bash from the repository root; knows which run directories they made."""

    def __init__(self) -> None:
        self.before = self._run_dirs()

    @staticmethod
    def _run_dirs() -> set[Path]:
        return {p for top in ("outputs", "multirun") for p in (ROOT / top).glob("**/") if p.is_dir()}

    def created(self) -> set[Path]:
        return self._run_dirs() - self.before

    def __call__(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        line = command if command.startswith("make") else f". .venv/bin/activate && {command}"
        return subprocess.run(
            ["bash", "-c", line], cwd=ROOT, env=_fresh_env(), capture_output=True, text=True, timeout=timeout
        )

    def cleanup(self) -> None:
        for path in sorted(self.created(), key=lambda p: len(p.parts)):
            shutil.rmtree(path, ignore_errors=True)  # only what this test created


@pytest.fixture
def readme_shell():
    shell = ReadmeShell()
    yield shell
    shell.cleanup()


def _assert_ran(command: str, proc: subprocess.CompletedProcess, shell: ReadmeShell) -> None:
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    runs = [
        Path(line.split(":", 1)[1].strip())
        for line in proc.stdout.splitlines()
        if line.startswith("outputs:")
    ]
    if command in ("python -m launch.run --cfg job", "make install", ". .venv/bin/activate"):
        assert not runs and not shell.created()
        if "--cfg" in command:
            assert "task:" in proc.stdout and "launcher:" in proc.stdout
        return
    if command.startswith("torchrun"):  # the worker prints no outputs line; its run dir follows the job id
        runs = [p for p in shell.created() if p.parent == ROOT / "outputs" / "torchrun"]
        result = json.loads((runs[0] / "check.json").read_text())
        assert result["world_size"] == 2 and result["backend"] == "gloo"
        assert yaml.safe_load((runs[0] / "config.yaml").read_text())["task"]["name"] == "check"
    assert runs and all((run / "config.yaml").is_file() for run in runs), proc.stdout[-2000:]
    for run in runs:
        if (run / "check.json").exists():
            assert json.loads((run / "check.json").read_text())["passed"]
        elif (run / "bench.json").exists():
            assert json.loads((run / "bench.json").read_text())["rows"]
        else:
            assert json.loads((run / "summary.json").read_text())["steps"] > 0
    if "-m experiment=small_batch" in command:  # one run per norm, both with one image per device
        summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
        assert sorted(s["norm"] for s in summaries) == ["bn", "syncbn"]
        assert all(s["batch_size"] == 1 for s in summaries)
    if "norm.group_size=2" in command:
        assert json.loads((runs[0] / "summary.json").read_text())["group_size"] == 2


FAST = [c for c, how in COMMANDS.items() if how == "run"]
PLACEHOLDERS = {"<head-ip>": "10.1.2.3", "<port>": "29400", "<id>": "exp1"}
SLOW = [c for c, how in COMMANDS.items() if how == "slow"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("command", FAST)
def test_readme_command_runs_as_written(command, readme_shell):
    _assert_ran(command, readme_shell(command, timeout=240), readme_shell)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("command", SLOW)
def test_long_readme_command_runs_as_written(command, readme_shell):
    _assert_ran(command, readme_shell(command, timeout=900), readme_shell)


@pytest.mark.parametrize("command", [c for c, how in COMMANDS.items() if how == "compose"])
def test_cluster_readme_command_composes_and_validates(command, monkeypatch):
    """Lines for other machines: their overrides are valid for our config (CUDA assumed present there)."""
    monkeypatch.setenv("SLURM_NNODES", "2")
    for placeholder, value in PLACEHOLDERS.items():  # what the README asks the user to fill in
        command = command.replace(placeholder, value)
    words = shlex.split(os.path.expandvars(command.split("&&")[-1]))
    if "launch.worker" in words:
        overrides = words[words.index("launch.worker") + 1 :]
        world_size = None  # set by torchrun at run time
    elif "launch.run" in words:
        overrides = words[words.index("launch.run") + 1 :]
        world_size = -1
    else:  # docker run IMAGE <overrides>: the image's entry point is python -m launch.run
        overrides = words[words.index("syncbn:cpu") + 1 :]
        world_size = -1
    cfg = compose(overrides)
    validate(cfg, cuda_available=True, world_size=fixed_world_size(cfg) if world_size == -1 else world_size)
