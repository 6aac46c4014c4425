"""A 2-process CPU DDP fit with SyncBatchNormPlugin, run as a script by tests/test_lightning.py.

    python tests/lightning_fit.py OUT_DIR

Lightning's ddp launcher runs this file again for rank 1. Each rank saves what its model ended with, and the
classes of its BatchNorm layers during and after training, to OUT_DIR/rank<N>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.standins

from tests.standins import BatchNormAct2d

BATCH, SAMPLES = 4, 16  # 8 samples per rank: 2 steps of 4, so a global batch of 8 per step


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), BatchNormAct2d(6), nn.Flatten(), nn.Linear(96, 4), nn.BatchNorm1d(4)
    ).double()


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(SAMPLES, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 + 1
    return TensorDataset(x, torch.randint(0, 4, (SAMPLES,), generator=gen))


def main(out_dir: Path) -> None:
    from lightning.pytorch import LightningModule, Trainer

    from syncbn.lightning import SyncBatchNormPlugin

    class Classifier(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_model()
            self.classes_in_training: list = []

        def training_step(self, batch, batch_idx):
            self.classes_in_training = [type(m).__name__ for m in self.net if "Norm" in type(m).__name__]
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(dataset(), batch_size=BATCH)

    module = Classifier()  # float64 already, so the default precision leaves it as it is
    # The README's line, plus settings that keep a test run short and quiet.
    quiet = {"max_epochs": 1, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = Trainer(accelerator="cpu", strategy="ddp", devices=2, plugins=[SyncBatchNormPlugin()], **quiet)
    trainer.fit(module)
    result = {
        "state": module.net.state_dict(),
        "classes_in_training": module.classes_in_training,
        "classes_after_fit": [type(m).__name__ for m in module.net if "Norm" in type(m).__name__],
        "world_size": trainer.world_size,
    }
    torch.save(result, out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
