"""Tier 1 for the launcher: every config composes and resolves, and bad values fail with one clear line."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from launch.config import ConfigError, compose, conf_dir, parse_nnodes, validate

GROUPS = {
    group: sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
    for group in ("task", "launcher", "model", "data", "norm", "experiment")
}


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
            ["task=train", "task=check"], ["norm=bn", "norm=syncbn"], ["data=synthetic"]
        )
    ],
)
def test_every_config_composes_resolves_and_validates(overrides):
    cfg = compose(overrides)
    validate(cfg, cuda_available=False)
    for key in ("nproc_per_node", "nnodes", "rdzv_endpoint", "run_id", "max_restarts", "timeout_s"):
        assert key in cfg["launcher"], key
    for key in ("epochs", "batch_size", "lr"):
        assert key in cfg["train"], key
    assert cfg["task"]["name"] in ("train", "check", "bench")
    assert cfg["model"]["in_channels"] == cfg["data"]["in_channels"]
    assert "hydra" not in cfg


def test_multinode_defaults_come_from_the_launchers_environment(monkeypatch):
    monkeypatch.setenv("PET_NNODES", "2:4")
    monkeypatch.setenv("PET_NPROC_PER_NODE", "8")
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "head:29400")
    monkeypatch.setenv("PET_RDZV_ID", "job-7")
    cfg = compose(["launcher=multinode"])
    assert cfg["launcher"]["nproc_per_node"] == 8
    assert parse_nnodes(cfg["launcher"]["nnodes"]) == (2, 4)
    assert cfg["launcher"]["rdzv_endpoint"] == "head:29400"
    assert cfg["launcher"]["run_id"] == "job-7"
    for name in ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_RDZV_ENDPOINT", "PET_RDZV_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NNODES", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("MASTER_ADDR", "node001")
    cfg = compose(["launcher=multinode"])
    assert parse_nnodes(cfg["launcher"]["nnodes"]) == (3, 3)
    assert cfg["launcher"]["run_id"] == "12345"
    assert cfg["launcher"]["rdzv_endpoint"] == "node001:29400"


def test_small_batch_experiment_sweeps_bn_against_syncbn():
    import yaml

    text = yaml.safe_load((conf_dir() / "experiment" / "small_batch.yaml").read_text())
    assert text["hydra"]["sweeper"]["params"]["norm"] == "bn,syncbn"
    assert compose(["experiment=small_batch"])["train"]["batch_size"] == 1


@pytest.mark.parametrize(
    ("overrides", "cuda", "message"),
    [
        (["launcher.nproc_per_node=0"], False, "nproc_per_node must be an integer >= 1, got 0"),
        (["device=cuda"], False, "CUDA is not available"),
        (["device=tpu"], False, "device must be cpu or cuda"),
        (["backend=nccl"], True, "backend=nccl needs device=cuda"),
        (["launcher.nnodes=0"], False, "launcher.nnodes must satisfy"),
        (["launcher.nnodes=two"], False, "integer or MIN:MAX"),
        (["syncbn.group_size=0"], False, "group_size must be null or an integer >= 1"),
        (["launcher.timeout_s=0"], False, "timeout_s must be > 0"),
    ],
)
def test_bad_values_raise_config_error(overrides, cuda, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        validate(compose(overrides), cuda_available=cuda)


def test_conf_dir_override_and_missing(monkeypatch, tmp_path: Path):
    (tmp_path / "config.yaml").write_text("x: 1\n")
    monkeypatch.setenv("SYNCBN_CONF_DIR", str(tmp_path))
    assert conf_dir() == tmp_path
    monkeypatch.setenv("SYNCBN_CONF_DIR", str(tmp_path / "nowhere"))
    assert conf_dir() != tmp_path  # falls back to the checkout's conf/
