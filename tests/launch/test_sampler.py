"""ResumableSampler (launch/sampler.py): DistributedSampler's order from position 0, and a position in
global samples that a restart at any world size continues from, skipping and repeating nothing."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from torch.utils.data import DistributedSampler

from launch.sampler import Indexed, ResumableSampler


def steps_of(size: int, world_size: int, batch: int, epoch: int, start: int = 0) -> list[list[int]]:
    """The global batches, in order: step k holds every rank's k-th batch."""
    ranks = []
    for rank in range(world_size):
        sampler = ResumableSampler(size, world_size, rank, seed=7)
        sampler.set_epoch(epoch, start=start)
        order = list(sampler)
        ranks.append([order[i : i + batch] for i in range(0, len(order), batch)])
    assert len({len(r) for r in ranks}) == 1  # every rank has the same number of steps
    return [[i for r in ranks for i in r[k]] for k in range(len(ranks[0]))]


@pytest.mark.parametrize(("size", "world_size"), [(10, 1), (10, 3), (37, 4), (5, 8)])
def test_from_the_start_it_is_distributed_sampler(size, world_size):
    for rank in range(world_size):
        ours = ResumableSampler(size, world_size, rank, seed=7)
        theirs = DistributedSampler(range(size), world_size, rank, shuffle=True, seed=7)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


@pytest.mark.parametrize(("size", "before", "after", "batch"), [(37, 2, 1, 3), (40, 4, 3, 2), (23, 1, 2, 4)])
def test_a_position_saved_at_one_world_size_continues_at_another(size, before, after, batch):
    """Every sample of the epoch exactly once, apart from the padding of the epoch's last step."""
    first = steps_of(size, before, batch, epoch=2)
    done = first[:3]
    position = sum(len(s) for s in done)  # what the checkpoint saves: global samples consumed
    assert position == 3 * before * batch
    rest = steps_of(size, after, batch, epoch=2, start=position)
    counts = Counter(i for step in done + rest for i in step)
    assert set(counts) == set(range(size))
    extra = sum(counts.values()) - size
    assert extra < after, extra  # only the padding that evens out the last step across ranks
    # The samples already trained on are not seen again, and the order of the rest is the epoch's.
    assert not {i for s in done for i in s} & ({i for s in rest for i in s} - set(rest[-1]))
    assert len(rest) == math.ceil(math.ceil((size - position) / after) / batch)


def test_bad_positions_and_ranks_are_refused():
    with pytest.raises(ValueError, match="rank 2 is not one of 2 replicas"):
        ResumableSampler(10, 2, 2, seed=0)
    with pytest.raises(ValueError, match="start 11 is outside the epoch's 10 samples"):
        ResumableSampler(10, 2, 0, seed=0).set_epoch(0, start=11)


def test_indexed_appends_the_index():
    data = Indexed([("a", 0), ("b", 1)])
    assert len(data) == 2 and data[1] == ("b", 1, 1)
