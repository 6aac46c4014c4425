"""Tier 3: Lightning with SyncBatchNormPlugin, 2 CPU processes under strategy="ddp", equals one process.

tests/lightning_fit.py runs as a subprocess (Lightning's launcher starts rank 1 by re-running it) with a hard
timeout that kills the whole session. The running statistics must end identical on both ranks and equal to
float64 training on the concatenated global batches; the plugin reverts the layers when fit ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from .reference import rel_err

SCRIPT = Path(__file__).with_name("lightning_fit.py")


def run_fit(out_dir: Path, timeout: float = 240.0) -> str:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out_dir)],
        cwd=out_dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so a hang can be killed with the rank Lightning started
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"Lightning fit still running after {timeout:.0f}s:\n{output[-3000:]}") from None
    assert proc.returncode == 0, f"Lightning fit failed (exit {proc.returncode}):\n{output[-3000:]}"
    return output


def single_process_reference() -> nn.Module:
    from torch.utils.data import DistributedSampler

    from .lightning_fit import BATCH, dataset, tiny_model

    data = dataset()
    # Lightning gives each rank a shuffling DistributedSampler (seed 0, epoch 0): the same indices here.
    per_rank = [
        list(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in range(2)
    ]
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for start in range(0, len(per_rank[0]), BATCH):
        rows = per_rank[0][start : start + BATCH] + per_rank[1][start : start + BATCH]  # the global batch
        x, y = data[rows]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # DDP's average of per-rank means, equal splits
        opt.step()
    return model


@pytest.mark.multiprocess
def test_lightning_ddp_on_cpu_syncs_batchnorm_statistics(tmp_path):
    pytest.importorskip("lightning")
    run_fit(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    want = single_process_reference().state_dict()
    for rank, result in enumerate(ranks):
        assert result["world_size"] == 2
        assert result["classes_in_training"] == ["SyncBatchNormAct2d", "SyncBatchNorm"]
        assert result["classes_after_fit"] == ["BatchNormAct2d", "BatchNorm1d"]  # the plugin reverted them
        errors = {k: rel_err(result["state"][k], want[k]) for k in want}
        assert not {k: e for k, e in errors.items() if not e < 1e-9}, (rank, errors)
    stats = [k for k in want if "running" in k]
    assert len(stats) == 4
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in stats)


def test_plugin_without_lightning_says_how_to_install_it(monkeypatch):
    monkeypatch.delitem(sys.modules, "syncbn.lightning", raising=False)
    monkeypatch.setitem(sys.modules, "lightning.pytorch.plugins", None)  # as if Lightning were absent
    with pytest.raises(ImportError, match=r'pip install "syncbn\[lightning\]"'):
        import syncbn.lightning  # noqa: F401
