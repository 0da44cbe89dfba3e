"""A resumable, shard-aware sampler: the data order is a pure function of (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Shuffled indices for one epoch, sharded over ``world`` processes, skippable.

    The permutation is ``torch.randperm(n)`` under a generator seeded with ``seed + epoch``;
    it is truncated to ``num_batches`` full global batches (``batch_size * world`` samples)
    so every process sees equal, full batches. Process ``rank`` takes ``perm[rank::world]``, so
    the union of the processes' b-th batches is exactly the b-th batch of a single process
    with a ``world`` times larger batch. ``skip_batches`` drops the first batches of the epoch
    (mid-epoch resume) without loading them.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.num_batches = n // (batch_size * world)
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        perm = perm[: self.num_batches * self.batch_size * self.world][self.rank :: self.world]
        yield from perm[self.skip_batches * self.batch_size :].tolist()

    def __len__(self) -> int:
        return (self.num_batches - self.skip_batches) * self.batch_size
