"""Typed schemas of the run configuration: one dataclass per config group, registered in Hydra's ConfigStore.

The YAML files in conf/ hold the values; each names its schema in its defaults list
(``/schema/<group>/<name>@_here_``), so Hydra itself rejects a wrong type or an unknown key while it composes.
Value checks a type cannot express (ranges, divisibility) live in launch/validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from omegaconf import MISSING


class Device(Enum):
    cpu = "cpu"
    cuda = "cuda"


class Backend(Enum):
    gloo = "gloo"
    nccl = "nccl"


class FaultKind(Enum):
    kill = "kill"  # SIGKILL the worker
    eval = "eval"  # the rank switches to eval mode: its SyncBN layers stop syncing


class DType(Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass
class Launcher:
    """launcher/*.yaml: how launch.run starts this node's workers (read by launch/agent.py)."""

    nproc_per_node: int = MISSING
    nnodes: str = MISSING  # "N" or "MIN:MAX", as torchrun writes it
    rdzv_endpoint: str = MISSING
    run_id: str = MISSING
    max_restarts: int = MISSING
    join_timeout_s: float = MISSING  # the rendezvous waiting for all nodes
    connect_timeout_s: float = MISSING  # a node waiting for the head's rendezvous store (launch/network.py)
    last_call_timeout_s: float = MISSING
    monitor_interval_s: float = MISSING
    is_host: bool | None = MISSING  # None: worked out from the route to the endpoint (launch/network.py)
    local_addr: str | None = MISSING
    run_dir: str = MISSING  # the run directory; hydra.run.dir follows it
    node_dir: str = MISSING  # this node's own files (.hydra/, the agent's log), relative to run_dir


@dataclass
class Fault:
    kind: FaultKind | None = MISSING
    rank: int = MISSING
    step: int = MISSING


@dataclass
class TrainTask:
    """task/train.yaml: launch/train.py."""

    name: str = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    weight_decay: float = MISSING
    checkpoint_every: int = MISSING
    resume: bool = MISSING
    log_samples: bool = MISSING
    compile: bool = MISSING
    fault: Fault = MISSING


@dataclass
class CheckTask:
    """task/check.yaml: launch/check.py."""

    name: str = MISSING
    global_batch: int = MISSING
    channels: int = MISSING
    spatial: list[int] = MISSING
    steps: int = MISSING
    tol: float = MISSING
    comm_iters: int = MISSING
    compile: bool = MISSING


@dataclass
class BenchTask:
    """task/bench.yaml: launch/bench.py."""

    name: str = MISSING
    shapes: list[list[int]] = MISSING
    channels_last: bool = MISSING
    dtypes: list[DType] = MISSING
    world_sizes: list[int] = MISSING
    threads: int = MISSING
    rounds: int = MISSING
    warmup: int = MISSING
    network_images: list[int] = MISSING
    network_rounds: int = MISSING
    compile: bool = MISSING


@dataclass
class SmallResNet:
    """model/resnet_small.yaml: launch.models.SmallResNet."""

    _target_: str = MISSING
    in_channels: int = MISSING
    num_classes: int = MISSING
    widths: list[int] = MISSING


@dataclass
class Data:
    """data/*.yaml: the train and test Datasets (any ``_target_`` and its keyword arguments)."""

    in_channels: int = MISSING
    num_classes: int = MISSING
    train: dict[str, Any] = MISSING
    test: dict[str, Any] = MISSING


@dataclass
class BatchNorm:
    """norm/bn.yaml: the model keeps plain per-rank BatchNorm."""

    name: str = MISSING


@dataclass
class SyncBatchNorm:
    """norm/syncbn.yaml: every BatchNorm becomes syncbn.SyncBatchNorm over the world or groups of ranks."""

    name: str = MISSING
    group_size: int | None = MISSING


@dataclass
class Config:
    """config.yaml: the root. Its own keys are what every worker's runtime reads (launch/runtime.py)."""

    launcher: Any = MISSING
    device: Device = MISSING
    backend: Backend | None = MISSING
    threads: int | None = MISSING
    timeout_s: float = MISSING
    seed: int = MISSING
    task: Any = MISSING
    model: Any = MISSING
    norm: Any = MISSING
    data: Any = MISSING


# (group, option) -> schema; conf/<group>/<option>.yaml lists /schema/<group>/<option>@_here_ first.
SCHEMAS: dict[tuple[str, str], type] = {
    ("launcher", "launcher"): Launcher,
    ("task", "train"): TrainTask,
    ("task", "check"): CheckTask,
    ("task", "bench"): BenchTask,
    ("model", "small_resnet"): SmallResNet,
    ("data", "data"): Data,
    ("norm", "bn"): BatchNorm,
    ("norm", "syncbn"): SyncBatchNorm,
}


def register() -> None:
    """Store every schema under schema/ in Hydra's ConfigStore (idempotent); call before composing."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="schema", name="config", node=Config)
    for (group, name), node in SCHEMAS.items():
        store.store(group=f"schema/{group}", name=name, node=node)
