"""Shared fixtures: every test leaves no process group and no changed environment behind."""

import datetime
import os

import pytest


@pytest.fixture(autouse=True)
def _clean_distributed_state():
    env = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(env)


@pytest.fixture
def world_of_one(tmp_path):
    """A real one-rank gloo group in this process, so the sync function itself runs without spawning."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'init'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=60),
    )
    yield
    dist.destroy_process_group()
