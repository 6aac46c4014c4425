"""Shared fixtures: every test leaves no process group and no changed environment behind."""

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
