"""Datasets the jobs train on: scikit-learn's bundled digits (real, offline) and a synthetic stand-in.

Any torch Dataset of (image (C, H, W) float tensor, label) pairs can replace them via ``_target_``.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


class Digits(Dataset):
    """The 1797 8x8 handwritten digits bundled with scikit-learn, standardized, as (1, 8, 8) images.

    The train/test split (80/20) is fixed by ``seed``, so every rank sees the same split.
    """

    def __init__(self, split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> None:
        from sklearn.datasets import load_digits  # imported here: only this dataset needs sklearn

        _check_split(split)
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
        labels = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        n_test = int(len(labels) * test_fraction)
        train_idx, test_idx = order[n_test:], order[:n_test]
        mean, std = images[train_idx].mean(), images[train_idx].std()  # statistics of train only
        idx = train_idx if split == "train" else test_idx
        self.images, self.labels = (images[idx] - mean) / std, labels[idx]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


class Synthetic(Dataset):
    """Noisy copies of one random prototype image per class; deterministic for a given ``seed``."""

    def __init__(
        self,
        split: str = "train",
        size: int = 512,
        in_channels: int = 3,
        num_classes: int = 4,
        image_size: int = 8,
        noise: float = 1.0,
        seed: int = 0,
    ) -> None:
        _check_split(split)
        gen = torch.Generator().manual_seed(seed)
        prototypes = torch.randn(num_classes, in_channels, image_size, image_size, generator=gen)
        gen.manual_seed(seed + (1 if split == "train" else 2))
        self.labels = torch.randint(0, num_classes, (size,), generator=gen)
        noise_t = noise * torch.randn(size, in_channels, image_size, image_size, generator=gen)
        self.images = prototypes[self.labels] + noise_t

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]
