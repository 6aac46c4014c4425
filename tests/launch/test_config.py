"""Tier 1 for the launcher's config: every config composes, is typed by its schema and validates; bad types,
keys and values fail with one line (config.py, schema.py, validate.py, preflight.py).
"""

from __future__ import annotations

import itertools
import os
import socket
from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from launch import schema
from launch.config import ConfigError, compose, compose_raw, conf_dir, fixed_world_size, parse_nnodes
from launch.preflight import preflight, sweep_points
from launch.validate import validate

GROUPS = {
    group: sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
    for group in ("task", "launcher", "model", "data", "norm", "experiment")
}


def check(overrides: list[str], cuda: bool = False) -> dict:
    cfg = compose(overrides)
    validate(cfg, cuda_available=cuda, world_size=fixed_world_size(cfg))
    return cfg


def test_every_group_has_its_documented_options():
    assert {"train", "check", "bench"} <= set(GROUPS["task"])
    assert {"local", "multinode"} <= set(GROUPS["launcher"])
    assert {"digits", "synthetic"} <= set(GROUPS["data"])
    assert {"syncbn", "bn"} <= set(GROUPS["norm"])
    assert {"small_batch", "smoke"} <= set(GROUPS["experiment"])


@pytest.mark.parametrize(
    "overrides",
    [
        [f"{group}={option}"]
        for group in ("task", "launcher", "model", "data", "norm", "experiment")
        for option in GROUPS[group]
    ]
    + [
        list(c)
        for c in itertools.product(
            ["task=train", "task=check", "task=bench"], ["norm=bn", "norm=syncbn"], ["data=synthetic"]
        )
    ],
)
def test_every_config_composes_resolves_and_validates(overrides):
    cfg = check(overrides)
    for key in ("nproc_per_node", "nnodes", "rdzv_endpoint", "run_id", "max_restarts", "run_dir"):
        assert key in cfg["launcher"], key
    for key in ("device", "backend", "threads", "timeout_s", "seed"):  # what the runtime reads
        assert key in cfg, key
    assert cfg["task"]["name"] in ("train", "check", "bench")
    assert cfg["model"]["in_channels"] == cfg["data"]["in_channels"]
    assert "hydra" not in cfg


@pytest.mark.parametrize("group", ["task", "launcher", "model", "data", "norm"])
def test_every_option_is_typed_by_its_schema(group):
    """Each group's YAML names its schema, so Hydra checks types and keys of every option."""
    for option in GROUPS[group]:
        node = compose_raw([f"{group}={option}"])[group]
        kind = OmegaConf.get_type(node)
        assert kind in schema.SCHEMAS.values(), (group, option, kind)
        assert set(node) == {f.name for f in fields(kind)}  # the YAML sets every key of its schema


def test_each_group_owns_its_settings():
    """The config reads like the code: task settings under task, the sync group size under the norm."""
    train = compose([])
    assert {"epochs", "batch_size", "lr", "fault"} <= set(train["task"]) and train["task"]["name"] == "train"
    assert set(compose(["task=check"])["task"]) >= {"global_batch", "channels", "spatial", "tol"}
    assert set(compose(["task=bench"])["task"]) >= {"shapes", "dtypes", "world_sizes", "rounds"}
    assert compose(["norm=syncbn"])["norm"] == {"name": "syncbn", "group_size": None}
    assert compose(["norm=bn"])["norm"] == {"name": "bn"}
    assert "timeout_s" not in train["launcher"] and train["timeout_s"] > 0
    assert not {"train", "fault", "check", "bench", "syncbn", "run_dir"} & set(train)


def test_multinode_defaults_come_from_the_launchers_environment(monkeypatch):
    monkeypatch.setenv("PET_NNODES", "2:4")
    monkeypatch.setenv("PET_NPROC_PER_NODE", "8")
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "head:29400")
    monkeypatch.setenv("PET_RDZV_ID", "job-7")
    cfg = compose(["launcher=multinode"])
    assert cfg["launcher"]["nproc_per_node"] == 8
    assert parse_nnodes(cfg["launcher"]["nnodes"]) == (2, 4) and fixed_world_size(cfg) is None
    assert cfg["launcher"]["rdzv_endpoint"] == "head:29400"
    assert cfg["launcher"]["run_id"] == "job-7" and cfg["launcher"]["run_dir"] == "outputs/job-7"
    # Each node's own files (Hydra's .hydra/, the agent's log) apart in the shared run directory.
    assert cfg["launcher"]["node_dir"] == f"nodes/{socket.gethostname()}-{os.getpid()}"
    assert compose([])["launcher"]["node_dir"] == "."
    for name in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_RDZV_ENDPOINT", "PET_RDZV_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NNODES", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("MASTER_ADDR", "node001")
    cfg = compose(["launcher=multinode"])
    assert parse_nnodes(cfg["launcher"]["nnodes"]) == (3, 3) and fixed_world_size(cfg) == 3
    assert cfg["launcher"]["run_id"] == "12345"
    assert cfg["launcher"]["rdzv_endpoint"] == "node001:29400"
    monkeypatch.setenv("PET_NPROC_PER_NODE", "gpu")  # torchrun's word, not a count: one line, not a crash
    with pytest.raises(ConfigError, match="could not be converted to Integer"):
        compose(["launcher=multinode"])


def test_small_batch_experiment_sweeps_bn_against_syncbn():
    import yaml

    text = yaml.safe_load((conf_dir() / "experiment" / "small_batch.yaml").read_text())
    assert text["hydra"]["sweeper"]["params"]["norm"] == "bn,syncbn"
    assert compose(["experiment=small_batch"])["task"]["batch_size"] == 1


def test_sweep_points_expand_like_hydras_basic_sweeper():
    assert sweep_points(["experiment=small_batch"]) == [
        ["norm=bn", "experiment=small_batch"],
        ["norm=syncbn", "experiment=small_batch"],
    ]
    # The command line replaces the config's sweep of the same key; sweeps multiply.
    points = sweep_points(["experiment=small_batch", "norm=bn", "task.lr=0.1,0.2"])
    assert points == [
        ["norm=bn", "experiment=small_batch", "task.lr=0.1"],
        ["norm=bn", "experiment=small_batch", "task.lr=0.2"],
    ]


# (overrides, cuda available, one line it must raise). Types and keys fail in Hydra, values in validate().
BAD = [
    (
        ["task.epochs=abc"],
        False,
        "task.epochs=abc: Value 'abc' of type 'str' could not be converted to Integer",
    ),
    (["train.epochs=abc"], False, "(train.* is now task.*"),
    (["launcher.timeout_s=abc"], False, "(launcher.timeout_s is now timeout_s"),
    (["timeout_s=abc"], False, "could not be converted to Float"),
    (["seed=abc"], False, "seed=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["no_such_key=1"], False, "Key 'no_such_key' not in 'Config'"),
    (["task=check", "task.epochs=3"], False, "Key 'epochs' not in 'CheckTask'"),
    (["norm=bn", "norm.group_size=2"], False, "Key 'group_size' not in 'BatchNorm'"),
    (["norm=nope"], False, "Could not find 'norm/nope' (options: bn, syncbn)"),
    (["task.epochs=["], False, "cannot parse override 'task.epochs=['"),
    (["task.fault.kind=bad"], False, "Invalid value 'bad', expected one of [kill, eval]"),
    (["device=tpu"], False, "Invalid value 'tpu', expected one of [cpu, cuda]"),
    (["task=bench", "task.dtypes=[int8]"], False, "Invalid value 'int8'"),
    (["task.batch_size=0"], False, "task.batch_size must be >= 1, got 0"),
    (["task.lr=-1"], False, "task.lr must be >= 0, got -1.0"),
    (["task.epochs=-1"], False, "task.epochs must be >= 0, got -1"),
    (["model.widths=[]"], False, "model.widths must list at least one width, got []"),
    (["model.widths=[16,0]"], False, "every entry of model.widths must be >= 1, got 0"),
    (["task=check", "task.spatial=[2,2,2,2]"], False, "task.spatial must hold 0 to 3 sizes"),
    (["task=check", "task.spatial=[0,5]"], False, "task.spatial must hold 0 to 3 sizes >= 1"),
    (["task=check", "task.global_batch=1", "task.spatial=[]"], False, "needs at least 2"),
    (["task=check", "task.tol=0"], False, "task.tol must be > 0, got 0.0"),
    (["task=bench", "task.shapes=[[8]]"], False, "task.shapes entries must be (N, C, *)"),
    (["task=bench", "task.world_sizes=[]"], False, "task.world_sizes must not be empty"),
    (["task.fault.kind=kill", "task.fault.rank=2"], False, "task.fault.rank=2 is not a rank of the 2 ranks"),
    (["task.fault.kind=eval", "task.fault.step=0"], False, "task.fault.step must be >= 1, got 0"),
    (["norm.group_size=3"], False, "norm.group_size=3 does not divide the world size 2"),
    (["norm.group_size=0"], False, "norm.group_size must be >= 1, got 0"),
    (["launcher.nproc_per_node=0"], False, "launcher.nproc_per_node must be >= 1, got 0"),
    (["device=cuda"], False, "CUDA is not available"),
    (["backend=nccl"], True, "backend=nccl needs device=cuda"),
    (["launcher.nnodes=0"], False, "launcher.nnodes must satisfy"),
    (["launcher.nnodes=two"], False, "integer or MIN:MAX"),
    (["launcher.nnodes=2"], False, "needs a fixed rendezvous port"),
    (["launcher=multinode", "launcher.rdzv_endpoint=head:port"], False, "needs a fixed rendezvous port"),
    (["launcher.connect_timeout_s=abc"], False, "could not be converted to Float"),
    (["launcher.connect_timeout_s=0"], False, "launcher.connect_timeout_s must be > 0, got 0.0"),
    (["launcher.join_timeout_s=0"], False, "launcher.join_timeout_s must be > 0, got 0.0"),
    (["timeout_s=0"], False, "timeout_s must be > 0, got 0.0"),
    (["launcher.max_restarts=-1"], False, "launcher.max_restarts must be >= 0, got -1"),
    (["threads=0"], False, "threads must be >= 1, got 0"),
    (["data=synthetic", "data.train.size=0"], False, "data.train.size must be >= 1, got 0"),
    (["data=synthetic", "data.train.size=abc"], False, "data.train.size must be a whole number"),
    (["data=synthetic", "data.test.image_size=2.5"], False, "image_size must be a whole number"),
    (["task.name=check"], False, "task.name='check' does not match the task's settings"),
]


@pytest.mark.parametrize(
    ("overrides", "cuda", "message"), BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None
)
def test_bad_types_keys_and_values_raise_one_line(overrides, cuda, message):
    with pytest.raises(ConfigError) as info:
        check(overrides, cuda)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_preflight_checks_every_sweep_point_and_the_environment(monkeypatch):
    preflight(["-m", "experiment=small_batch"], cuda_available=False)
    with pytest.raises(ConfigError, match=r"task.lr must be >= 0"):
        preflight(["-m", "norm=bn,syncbn", "task.lr=0.1,-1"], cuda_available=False)
    # Printing the config checks types, but not values a run would need.
    preflight(["--cfg", "job", "task.lr=-1"], cuda_available=False)
    with pytest.raises(ConfigError, match="could not be converted to Integer"):
        preflight(["--cfg", "job", "task.epochs=abc"], cuda_available=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "outer")
    with pytest.raises(ConfigError, match="cannot run inside an elastic job"):
        preflight([], cuda_available=False)


def test_conf_dir_override_and_missing(monkeypatch, tmp_path: Path):
    (tmp_path / "config.yaml").write_text("x: 1\n")
    monkeypatch.setenv("SYNCBN_CONF_DIR", str(tmp_path))
    assert conf_dir() == tmp_path
    monkeypatch.setenv("SYNCBN_CONF_DIR", str(tmp_path / "nowhere"))
    assert conf_dir() != tmp_path  # falls back to the checkout's conf/
