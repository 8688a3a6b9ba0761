"""Data order and augmentation randomness as pure functions of (seed, step), so that a
run resumed at step s reads exactly the batches an uninterrupted run reads, and N
processes together read exactly the global batch one process would.

The training stream is endless: sample number ``p = step * global_batch + j`` is item
``perm_e[p mod N]`` of epoch ``e = p // N`` (a permutation seeded by ``(seed, e)``), and
it is augmented with generators seeded by ``(seed, p)``. Process ``r`` of ``W`` takes
positions ``j`` in ``[r*B/W, (r+1)*B/W)`` of each global batch.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["StepBatchSampler", "SeededDataset", "sample_seed", "epoch_permutation", "ShardSampler"]


def sample_seed(seed: int, position: int) -> int:
    """A 63-bit seed for sample number ``position`` of the stream."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(position)]).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919 + 17) & ((1 << 63) - 1))
    return torch.randperm(n, generator=g)


class StepBatchSampler(Sampler[List[Tuple[int, int]]]):
    """Yields, for steps ``start_step .. max_steps-1``, this process's share of each global
    batch as ``(dataset_index, sample_seed)`` pairs (consumed by :class:`SeededDataset`)."""

    def __init__(self, dataset_len: int, global_batch: int, max_steps: int, seed: int = 0,
                 start_step: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if dataset_len <= 0:
            raise ValueError("the training dataset is empty")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes")
        self.n = int(dataset_len)
        self.global_batch = int(global_batch)
        self.local_batch = self.global_batch // world_size
        self.max_steps = int(max_steps)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = shuffle
        self._perm_cache = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: epoch_permutation(self.n, self.seed, epoch) if self.shuffle
                                else torch.arange(self.n)}
        return self._perm_cache[epoch]

    def batch_for_step(self, step: int) -> List[Tuple[int, int]]:
        out = []
        first = step * self.global_batch + self.rank * self.local_batch
        for p in range(first, first + self.local_batch):
            epoch, offset = divmod(p, self.n)
            out.append((int(self._perm(epoch)[offset]), sample_seed(self.seed, p)))
        return out

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for step in range(self.start_step, self.max_steps):
            yield self.batch_for_step(step)

    def __len__(self) -> int:
        return max(self.max_steps - self.start_step, 0)


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index starting at ``rank`` (evaluation: no padding, no repeats)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, limit: Optional[int] = None):
        self.indices = list(range(min(n, limit) if limit else n))[rank::world_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class SeededDataset(Dataset):
    """Wraps a dataset so item ``(index, seed)`` is loaded and transformed with the Python,
    NumPy and torch generators seeded by ``seed``; the caller's generator states are
    restored afterwards (so loading in the main process does not disturb its randomness).
    Plain integer indices load without reseeding (evaluation)."""

    def __init__(self, dataset, transform: Optional[Callable] = None):
        self.dataset = dataset
        self.transform = transform

    def __len__(self):
        return len(self.dataset)

    @property
    def metadata(self):
        return getattr(self.dataset, "metadata", None)

    def _load(self, index):
        sample = self.dataset[index]
        return self.transform(sample) if self.transform is not None else sample

    def __getitem__(self, item):
        if not isinstance(item, (tuple, list)):
            return self._load(int(item))
        index, seed = int(item[0]), int(item[1])
        py_state = random.getstate()
        np_state = np.random.get_state()
        torch_state = torch.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed % (1 << 32))
            torch.manual_seed(seed)
            return self._load(index)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)
