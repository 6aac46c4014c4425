"""Helpers for end-to-end launcher tests: run `python -m ...` as a user would, in a clean environment.

The tests' own environment may come from a launcher (torchrun, Slurm, Kubeflow): its variables are removed
so every job starts as on a fresh login shell.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A seconds-long training run: 48 synthetic images, 2 epochs.
SMOKE = ["experiment=smoke", "data.train.size=48", "data.test.size=24", "task.epochs=2"]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "PET_", "SLURM_"))}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env["PYTHONPATH"] = str(ROOT)
    return env


def run(args: list[str], timeout: float = 100, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python <args>`` from the repository root; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    """``python <args>`` from the repository root, in the background; stdout and stderr piped as text."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env or clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
