"""Static checks of the cluster recipes (no Docker engine, Slurm or Kubernetes needed).

Every launcher command in docker/compose.yaml, docker/k8s/*.yaml and docker/slurm/*.sbatch must compose with
our Hydra config (same overrides, no unknown keys) and pass validation; shell scripts must parse.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from launch.config import compose, fixed_world_size, parse_nnodes
from launch.validate import validate

DOCKER = Path(__file__).resolve().parents[2] / "docker"
ROOT = DOCKER.parent


def _launch_commands(text: str) -> list[list[str]]:
    """The override lists of every `python -m launch.run ...` in a shell command line."""
    commands = []
    for segment in re.split(r"&&|;|\n(?=\s*python)", text):
        words = shlex.split(segment.replace("\\\n", " "))
        for i in range(len(words) - 2):
            if words[i : i + 3] == ["python", "-m", "launch.run"]:
                commands.append(words[i + 3 :])
    return commands


def _check(overrides: list[str], cuda: bool = False) -> dict:
    cfg = compose(overrides)
    validate(cfg, cuda_available=cuda, world_size=fixed_world_size(cfg))
    return cfg


def test_compose_file_parses_and_every_command_composes():
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = spec["services"]
    assert {"head", "worker"} <= set(services)
    # One command for every node: nothing per node but the container's name.
    assert len({" ".join(s["command"]) for s in services.values()}) == 1
    service = services["head"]
    assert "environment" not in service  # each node picks its interface from its route to the head
    assert service["volumes"] == ["outputs:/outputs"] and service["shm_size"]
    commands = _launch_commands(" ".join(service["command"]))
    assert len(commands) == 2
    tasks = []
    for overrides in commands:
        cfg = _check(overrides)
        assert cfg["launcher"]["rdzv_endpoint"] == "head:29400" and cfg["launcher"]["is_host"] is None
        assert not any(o.startswith(("launcher.is_host", "launcher.local_addr")) for o in overrides)
        tasks.append(cfg["task"]["name"])
    assert tasks == ["check", "train"]


def test_kubernetes_job_parses_and_composes_with_the_injected_env(monkeypatch):
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "pytorchjob.yaml").read_text()))
    job = docs[0]
    assert job["kind"] == "PyTorchJob" and job["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "launch.run"]
    # What the training operator injects for this spec.
    policy = job["spec"]["elasticPolicy"]
    monkeypatch.setenv("PET_NNODES", f"{policy['minReplicas']}:{policy['maxReplicas']}")
    monkeypatch.setenv("PET_NPROC_PER_NODE", job["spec"]["nprocPerNode"])
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "syncbn-worker-0:29400")
    monkeypatch.setenv("PET_RDZV_ID", policy["rdzvId"])
    monkeypatch.setenv("PET_MAX_RESTARTS", str(policy["maxRestarts"]))
    cfg = _check(container["args"])
    assert parse_nnodes(cfg["launcher"]["nnodes"]) == (2, 2)
    assert cfg["launcher"]["nproc_per_node"] == 2 and cfg["launcher"]["max_restarts"] == 3
    assert cfg["timeout_s"] == 300
    assert (
        cfg["launcher"]["rdzv_endpoint"] == "syncbn-worker-0:29400" and cfg["launcher"]["run_id"] == "syncbn"
    )


def test_sbatch_script_parses_and_its_command_composes(monkeypatch):
    script = DOCKER / "slurm" / "syncbn.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "scontrol show hostnames" in text and "--ntasks-per-node=1" in text
    for name, value in {
        "SLURM_NNODES": "2",
        "NPROC": "4",
        "HEAD_NODE": "node001",
        "RDZV_PORT": "29400",
        "SLURM_JOB_ID": "4242",
    }.items():
        monkeypatch.setenv(name, value)
    inner = text[text.index("srun ") : text.rindex('"$@"')]
    commands = _launch_commands(os.path.expandvars(inner))
    assert len(commands) == 1  # one command, the same on every node
    assert not any(o.startswith(("launcher.is_host", "launcher.local_addr", "hydra.")) for o in commands[0])
    cfg = _check(commands[0], cuda=True)
    assert cfg["launcher"]["rdzv_endpoint"] == "node001:29400" and str(cfg["launcher"]["run_id"]) == "4242"
    assert parse_nnodes(cfg["launcher"]["nnodes"]) == (2, 2) and cfg["device"] == "cuda"


@pytest.mark.parametrize("script", sorted(DOCKER.rglob("*.sh")) + sorted(DOCKER.rglob("*.sbatch")), ids=str)
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_dockerfile_follows_the_recipe():
    text = (DOCKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "launch.run"]' in text
    assert "PYTHONUNBUFFERED=1" in text and "\nUSER syncbn" in text and "ARG BASE_IMAGE=" in text
    pinned = re.search(r"^torch==([\d.]+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in text  # the image runs what CI tests
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "outputs"} <= set(ignored)
