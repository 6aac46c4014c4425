"""A distributed sampler whose position is a count of global samples, valid at any world size.

The epoch's order is one seeded permutation of the whole dataset, the same for every world size; rank r
takes every W-th entry, so step k of all ranks together covers positions [k*W*B, (k+1)*W*B) of it. A
checkpoint saves how many positions were consumed, and a restart with another world size goes on from
there. From position 0 the order is exactly that of DistributedSampler(shuffle=True, drop_last=False).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """This rank's share of the epoch's permutation, from ``start`` global samples in (see set_epoch)."""

    def __init__(self, size: int, num_replicas: int, rank: int, seed: int) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not one of {num_replicas} replicas")
        self.size, self.num_replicas, self.rank, self.seed = size, num_replicas, rank, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Sample epoch ``epoch``, skipping the ``start`` positions of its order already trained on."""
        if not 0 <= start <= self.size:
            raise ValueError(f"start {start} is outside the epoch's {self.size} samples")
        self.epoch, self.start = epoch, start

    def remaining(self) -> list[int]:
        """Dataset indices of the epoch from ``start`` on, padded (with its own first entries) so that every
        rank gets the same number: SyncBN needs all ranks at every step."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)  # as DistributedSampler seeds it
        rest = torch.randperm(self.size, generator=gen)[self.start :].tolist()
        padding = len(self) * self.num_replicas - len(rest)
        if rest and padding:
            rest += (rest * math.ceil(padding / len(rest)))[:padding]
        return rest

    def __iter__(self) -> Iterator[int]:
        return iter(self.remaining()[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return math.ceil((self.size - self.start) / self.num_replicas)


class Indexed(Dataset):
    """``dataset`` with each item's index appended: (x, y, index), so a step knows which samples it saw."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        return (*self.dataset[i], i)
