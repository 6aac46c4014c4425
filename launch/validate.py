"""validate(): every value check a schema's types cannot express, run before any worker starts.

launch.run calls it for each job (each sweep point) before Hydra makes a run directory; launch.worker calls
it under an external launcher. Each failure raises ConfigError naming the key and the value.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from . import schema
from .config import ConfigError, parse_nnodes


def validate(cfg: dict[str, Any], *, world_size: int | None, cuda_available: bool | None = None) -> None:
    """Raise ConfigError for the first bad value.

    ``world_size`` is None when only the rendezvous knows it (an elastic node range); ``cuda_available``
    None asks torch, which is imported only for device=cuda (a rejected config fails in a fraction of a
    second instead of after torch's import).
    """
    _runtime(cfg, cuda_available)
    _launcher(cfg["launcher"])
    _norm(cfg["norm"], world_size)
    _model_and_data(cfg["model"], cfg["data"])
    task = cfg["task"]
    name = task.get("name")
    expected = schema.SCHEMAS.get(("task", str(name)))
    if expected is None or set(task) != {f.name for f in fields(expected)}:
        raise ConfigError(
            f"task.name={name!r} does not match the task's settings; choose a task with task=NAME"
        )
    TASKS[name](task, world_size)


def check_group_size(group_size: int | None, world_size: int) -> None:
    """The one divisibility check: before launch when the world size is fixed, else in each worker."""
    if group_size is not None and world_size % group_size:
        raise ConfigError(f"norm.group_size={group_size} does not divide the world size {world_size}")


def backend_for(cfg: dict[str, Any]) -> str:
    return cfg["backend"] or ("nccl" if cfg["device"] == "cuda" else "gloo")


def _at_least(key: str, value: Any, low: float, *, strict: bool = False) -> None:
    # Untyped sections (a dataset's arguments) can hold anything an override typed: say so in one line.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number {'>' if strict else '>='} {low:g}, got {value!r}")
    if value < low or (strict and value == low):
        raise ConfigError(f"{key} must be {'>' if strict else '>='} {low:g}, got {value!r}")


def _runtime(cfg: dict[str, Any], cuda_available: bool | None) -> None:
    if cfg["device"] == "cuda" and not (_torch_sees_cuda() if cuda_available is None else cuda_available):
        raise ConfigError("device=cuda but CUDA is not available on this machine; use device=cpu (gloo)")
    if backend_for(cfg) == "nccl" and cfg["device"] != "cuda":
        raise ConfigError("backend=nccl needs device=cuda; CPU tensors need gloo")
    if cfg["threads"] is not None:
        _at_least("threads", cfg["threads"], 1)
    _at_least("timeout_s", cfg["timeout_s"], 0, strict=True)


def _torch_sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _launcher(launcher: dict[str, Any]) -> None:
    _at_least("launcher.nproc_per_node", launcher["nproc_per_node"], 1)
    _, max_nodes = parse_nnodes(launcher["nnodes"])
    port = launcher["rdzv_endpoint"].rpartition(":")[2]
    if max_nodes > 1 and not (port.isdigit() and 0 < int(port) < 65536):
        raise ConfigError(
            f"launcher.nnodes={launcher['nnodes']} needs a fixed rendezvous port that every node can reach, "
            f"got launcher.rdzv_endpoint={launcher['rdzv_endpoint']!r} (e.g. head-node:29400)"
        )
    _at_least("launcher.max_restarts", launcher["max_restarts"], 0)
    for key in ("join_timeout_s", "connect_timeout_s", "monitor_interval_s"):
        _at_least(f"launcher.{key}", launcher[key], 0, strict=True)
    _at_least("launcher.last_call_timeout_s", launcher["last_call_timeout_s"], 1)  # torch: whole seconds > 0


def _norm(norm: dict[str, Any], world_size: int | None) -> None:
    group_size = norm.get("group_size")
    if group_size is not None:
        _at_least("norm.group_size", group_size, 1)
        if world_size is not None:
            check_group_size(group_size, world_size)


def _model_and_data(model: dict[str, Any], data: dict[str, Any]) -> None:
    for section, values in (("model", model), ("data", data)):
        for key in ("in_channels", "num_classes"):
            if key in values:
                _at_least(f"{section}.{key}", values[key], 1)
    if "widths" in model:
        if not model["widths"]:
            raise ConfigError("model.widths must list at least one width, got []")
        for width in model["widths"]:
            _at_least("every entry of model.widths", width, 1)
    for split in ("train", "test"):
        for key in ("size", "image_size"):
            if key in data[split]:
                value = data[split][key]
                if not isinstance(value, int) or isinstance(value, bool):  # a count of samples or pixels
                    raise ConfigError(f"data.{split}.{key} must be a whole number >= 1, got {value!r}")
                _at_least(f"data.{split}.{key}", value, 1)


def _train(task: dict[str, Any], world_size: int | None) -> None:
    _at_least("task.epochs", task["epochs"], 0)
    _at_least("task.batch_size", task["batch_size"], 1)
    for key in ("lr", "momentum", "weight_decay", "checkpoint_every"):
        _at_least(f"task.{key}", task[key], 0)
    fault = task["fault"]
    if fault["kind"] is not None:
        _at_least("task.fault.step", fault["step"], 1)
        _at_least("task.fault.rank", fault["rank"], 0)
        if world_size is not None and fault["rank"] >= world_size:
            raise ConfigError(f"task.fault.rank={fault['rank']} is not a rank of the {world_size} ranks")


def _check(task: dict[str, Any], world_size: int | None) -> None:
    for key in ("global_batch", "channels", "steps", "comm_iters"):
        _at_least(f"task.{key}", task[key], 1)
    _at_least("task.tol", task["tol"], 0, strict=True)
    spatial = task["spatial"]
    if len(spatial) > 3 or any(size < 1 for size in spatial):
        raise ConfigError(
            f"task.spatial must hold 0 to 3 sizes >= 1 ((N, C), 1-D, 2-D or 3-D input), got {spatial}"
        )
    if task["global_batch"] * math.prod(spatial) < 2:
        raise ConfigError(
            f"task.global_batch={task['global_batch']} x task.spatial={spatial} gives one value per channel; "
            "training-mode BatchNorm needs at least 2"
        )


def _bench(task: dict[str, Any], world_size: int | None) -> None:
    for shape in task["shapes"]:
        if len(shape) < 2 or any(size < 1 for size in shape):
            raise ConfigError(f"task.shapes entries must be (N, C, *) with sizes >= 1, got {shape}")
    for key in ("dtypes", "world_sizes", "shapes"):
        if not task[key]:
            raise ConfigError(f"task.{key} must not be empty")
    for size in task["world_sizes"]:
        _at_least("every entry of task.world_sizes", size, 1)
    _at_least("task.threads", task["threads"], 1)
    _at_least("task.rounds", task["rounds"], 1)
    _at_least("task.warmup", task["warmup"], 0)


TASKS = {"train": _train, "check": _check, "bench": _bench}
