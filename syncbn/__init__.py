"""syncbn: synchronized batch normalization for PyTorch; exact, numerically stable, CPU/gloo and CUDA/NCCL.

from syncbn import convert_sync_batchnorm
model = convert_sync_batchnorm(model)   # before wrapping in DistributedDataParallel
"""

from .convert import BatchNormNd, convert_sync_batchnorm, revert_sync_batchnorm
from .functional import sync_batch_norm
from .modules import SyncBatchNorm

__all__ = [
    "BatchNormNd",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "sync_batch_norm",
]
__version__ = "0.1.0"
