"""Lightning plugin: train a LightningModule with syncbn's SyncBatchNorm, on CPU (gloo) as on GPUs.

    from lightning.pytorch import Trainer
    from syncbn.lightning import SyncBatchNormPlugin
    trainer = Trainer(accelerator="cpu", strategy="ddp", devices=2, plugins=[SyncBatchNormPlugin()])

Lightning's own ``Trainer(sync_batchnorm=True)`` uses torch.nn.SyncBatchNorm, which refuses CPU tensors. Needs
the ``[lightning]`` extra: ``pip install "syncbn[lightning]"``.
"""

from __future__ import annotations

from torch import nn

from .convert import convert_sync_batchnorm, revert_sync_batchnorm

try:
    from lightning.pytorch.plugins import LayerSync
except ImportError as e:  # an optional dependency: say how to get it
    raise ImportError(
        'syncbn.lightning needs Lightning; install it with: pip install "syncbn[lightning]"'
    ) from e


class SyncBatchNormPlugin(LayerSync):
    """A ``LayerSync`` plugin: Lightning converts the model when fitting starts and reverts it at teardown.

    Conversion is :func:`syncbn.convert_sync_batchnorm` over the whole world (BatchNorm subclasses keep their
    own forward, or fit refuses with a ValueError naming the layer); revert gives back the original classes,
    so the module you hold after ``fit`` has plain BatchNorm layers with the trained statistics. To sync over
    a subgroup, subclass it and pass that group in :meth:`apply` (the group exists only once Lightning has set
    up the process group).
    """

    def apply(self, model: nn.Module) -> nn.Module:
        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        return revert_sync_batchnorm(model)
