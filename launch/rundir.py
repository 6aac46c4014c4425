"""Run directories are never shared by accident: a job claims its directory with a marker file, job.json.

launch.run claims the directory before Hydra writes anything into it. A new or empty directory is claimed;
one that holds another job's files is refused (one line, exit 2) unless task.resume=true takes it over,
except that a name made from the clock (the default, outputs/<date>/<time>-<task>) moves on to <name>-2,
-3, ...: two jobs started in the same second get two directories. The nodes of one multi-node job share
their directory by claiming it under the same key (launcher.run_id and the rendezvous endpoint). Under an
external launcher (torchrun, srun, Kubeflow) global rank 0 claims it, keyed by the elastic run id.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import report
from .config import ConfigError, compose_raw, parse_nnodes

MARKER = "job.json"
JOB_ENV = "SYNCBN_JOB"  # the claiming job's token, for the workers launch.run starts (checkpoints carry it)


@dataclass(frozen=True)
class Claim:
    run_dir: Path
    token: str  # this job's id; its checkpoints carry it, so its own restarts resume without being asked


def claim(run_dir: Path, key: str | None, *, resume: bool, renumber: bool = False) -> Claim:
    """Claim ``run_dir`` for this job, or raise ConfigError saying whose it is.

    ``key``: jobs with the same key share the directory (the nodes of one job); None: never shared.
    ``resume``: an explicit resume may take over a directory of a job that is not running here.
    ``renumber``: instead of refusing, try ``<name>-2``, ``<name>-3``, ... (a name made from the clock).
    """
    for n in range(1, 1000):
        candidate = run_dir if n == 1 else run_dir.with_name(f"{run_dir.name}-{n}")
        outcome = _try_claim(candidate, key, resume)
        if isinstance(outcome, Claim):
            return outcome
        if not renumber:
            raise ConfigError(
                f"run directory {candidate} {outcome}; pass task.resume=true to continue that job there, "
                "or choose another launcher.run_dir"
            )
    raise ConfigError(f"no free run directory among {run_dir}-2 ... -999")


def finish(claimed: Claim) -> None:
    """Mark the job finished, if the marker is still ours: a later job with the same key no longer joins."""
    marker = _read(claimed.run_dir)
    if marker is not None and marker.get("token") == claimed.token:
        _write(claimed.run_dir, marker | {"state": "finished", "ended": _now()})


def _try_claim(path: Path, key: str | None, resume: bool) -> Claim | str:
    """A Claim, or why ``path`` is not this job's to write into."""
    path.mkdir(parents=True, exist_ok=True)
    mine = {"token": uuid.uuid4().hex, "key": key, "host": socket.gethostname(), "pid": os.getpid()}
    mine |= {"started": _now(), "state": "running"}
    theirs = _read(path)
    if theirs is None:
        others = sorted(p.name for p in path.iterdir() if not p.name.startswith((MARKER, f".{MARKER}")))
        if others and not resume:
            return f"already holds files of another run ({', '.join(others[:4])})"
        if _create(path, mine):
            return Claim(path, mine["token"])
        theirs = _read(path) or {}  # another job claimed it a moment ago
    if key is not None and theirs.get("key") == key and theirs.get("state") == "running":
        return Claim(path, theirs["token"])  # another node of the same job
    owner = f"pid {theirs.get('pid')} on {theirs.get('host')}, started {theirs.get('started')}"
    if _running_here(theirs):
        return f"is in use by a running job ({owner})"  # not even an explicit resume takes it from under it
    if resume:
        _write(path, mine)
        return Claim(path, mine["token"])
    return f"belongs to another job ({owner}, {theirs.get('state', 'unknown state')})"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _read(path: Path) -> dict[str, Any] | None:
    """The marker in ``path``: None if there is none, {} if it cannot be read (a foreign job's, then)."""
    try:
        data = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _create(path: Path, marker: dict[str, Any]) -> bool:
    """Write the marker only if there is none, atomically (complete or absent, even on NFS): True if so."""
    tmp = path / f".{MARKER}.{marker['token']}"
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    try:
        os.link(tmp, path / MARKER)  # fails if the marker exists: of two jobs, exactly one wins
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _write(path: Path, marker: dict[str, Any]) -> None:
    report.write_json(path / MARKER, marker)  # whole, under a temporary name of this write's own


def _running_here(marker: dict[str, Any]) -> bool:
    """The marker's job is still running on this machine (its launcher process is alive)."""
    pid = marker.get("pid")
    if marker.get("state") != "running" or marker.get("host") != socket.gethostname() or not pid:
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to another user
        return True
    return True


def prepare(overrides: list[str], *, multirun: bool) -> tuple[Claim, str]:
    """Claim the directory ``launch.run <overrides>`` would write to, before Hydra touches it.

    Returns the claim and the override that makes Hydra use exactly that directory (``hydra.run.dir=`` or,
    for --multirun, ``hydra.sweep.dir=``). For task=train with task.resume=true the checkpoint is checked
    first (it exists, it can be read, this run's settings match it): a refused resume leaves no trace.
    """
    from omegaconf import OmegaConf

    from .preflight import sweep_points

    cfg = compose_raw(sweep_points(overrides)[0] if multirun else overrides, hydra_keys=True)
    node = "sweep" if multirun else "run"
    raw_dir = str(OmegaConf.to_container(cfg.hydra[node], resolve=False)["dir"])
    raw_run_dir = str(OmegaConf.to_container(cfg.launcher, resolve=False)["run_dir"])
    from_clock = "${now:" in raw_dir or ("launcher.run_dir" in raw_dir and "${now:" in raw_run_dir)
    plain = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("launcher", "task", "data")}
    plain["seed"] = cfg.seed
    launcher, task = plain["launcher"], plain["task"]
    _, max_nodes = parse_nnodes(launcher["nnodes"])
    # The nodes of one job: same run id and rendezvous; a one-node job shares its directory with no one.
    key = f"{launcher['run_id']}@{launcher['rdzv_endpoint']}" if max_nodes > 1 and not multirun else None
    resume = bool(task.get("resume", False))
    directory = Path(str(cfg.hydra[node].dir))
    if task["name"] == "train" and resume and not multirun:
        # Without a shared filesystem another node may hold the checkpoint: multi-node leaves that to rank 0.
        _check_resume(plain, directory, required=max_nodes == 1)
    claimed = claim(directory, key, resume=resume, renumber=from_clock)
    quoted = str(claimed.run_dir).replace("\\", "\\\\").replace("'", "\\'")
    return claimed, f"hydra.{node}.dir='{quoted}'"


def _check_resume(cfg: dict[str, Any], run_dir: Path, *, required: bool) -> None:
    """launch/checkpoint.py's resume checks, run by the launcher (imports torch: only when resuming)."""
    from hydra.utils import instantiate

    from . import checkpoint

    if not required and not checkpoint.path(run_dir).exists():
        return  # nothing to compare with
    size = len(instantiate(cfg["data"]["train"]))
    try:
        checkpoint.resumable(run_dir, checkpoint.run_record(cfg, 0, size), explicit=required)
    except checkpoint.CheckpointError as e:
        raise ConfigError(str(e)) from None
