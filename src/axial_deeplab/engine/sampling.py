"""Data order and augmentation randomness as pure functions of (seed, step), so that a
run resumed at step s reads exactly the batches an uninterrupted run reads, and N
processes together read exactly the global batch one process would.

The training stream is endless: sample number ``p = step * global_batch + j`` is item
``perm_e[p mod N]`` of epoch ``e = p // N`` (a permutation seeded by ``(seed, e)``), and
it is augmented with generators seeded by ``(seed, p)``. Process ``r`` of ``W`` takes
positions ``j`` in ``[r*B/W, (r+1)*B/W)`` of each global batch.

A bad input met by a DataLoader worker (a corrupt image, a missing file) reaches the main
process as the same error, with the same message, that loading in the main process gives
(:class:`CarriedError`): PyTorch would otherwise re-raise it with the worker's whole
traceback as its message.
"""

from __future__ import annotations

import pickle
import random
import signal
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from ..errors import UserError

__all__ = [
    "StepBatchSampler",
    "SeededDataset",
    "sample_seed",
    "epoch_permutation",
    "ShardSampler",
    "CarriedError",
    "CarryingCollate",
    "reraise_carried",
    "ignore_sigint",
    "INPUT_ERRORS",
]

# Errors that mean "this input is bad" (the command line prints them as one line); anything
# else is a bug and keeps its traceback, from a worker too.
INPUT_ERRORS = (UserError, FileNotFoundError, ValueError)


class CarriedError:
    """An input error raised while a DataLoader worker loaded a sample, sent to the main
    process in place of the sample (and of its batch, see :class:`CarryingCollate`)."""

    def __init__(self, error: BaseException):
        self.message = str(error)
        self.error: Optional[BaseException] = None
        try:  # the DataLoader pickles what a worker returns: keep the error only if it survives that
            copy = pickle.loads(pickle.dumps(error))
            if type(copy) is type(error) and str(copy) == self.message:
                self.error = error.with_traceback(None)
        except Exception:
            pass

    def rebuild(self) -> BaseException:
        """The error as the main process would have raised it (a :class:`UserError` with the
        same message when it could not travel)."""
        return self.error if self.error is not None else UserError(self.message)


class CarryingCollate:
    """Wraps a collate function: a batch holding a :class:`CarriedError` becomes that error."""

    def __init__(self, collate: Callable):
        self.collate = collate

    def __call__(self, samples):
        for sample in samples:
            if isinstance(sample, CarriedError):
                return sample
        return self.collate(samples)


def reraise_carried(batch: Any) -> None:
    """Raise the error a worker met building ``batch``, if it met one."""
    if isinstance(batch, CarriedError):
        raise batch.rebuild()


def ignore_sigint(worker_id: Optional[int] = None) -> None:
    """A DataLoader ``worker_init_fn``: Ctrl-C at a terminal reaches every process of the group; the
    main process decides how to stop, and a worker killed under it would only add noise."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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

    def __init__(
        self,
        dataset_len: int,
        global_batch: int,
        max_steps: int,
        seed: int = 0,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
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
            self._perm_cache = {
                epoch: epoch_permutation(self.n, self.seed, epoch) if self.shuffle else torch.arange(self.n)
            }
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
    Plain integer indices load without reseeding (evaluation).

    With ``carry_errors``, an input error (:data:`INPUT_ERRORS`) in a DataLoader worker is
    returned as a :class:`CarriedError` instead of raised (collate with :class:`CarryingCollate`
    and call :func:`reraise_carried` on each batch)."""

    def __init__(self, dataset, transform: Optional[Callable] = None, carry_errors: bool = False):
        self.dataset = dataset
        self.transform = transform
        self.carry_errors = carry_errors

    def __len__(self):
        return len(self.dataset)

    @property
    def metadata(self):
        return getattr(self.dataset, "metadata", None)

    def _load(self, index):
        sample = self.dataset[index]
        return self.transform(sample) if self.transform is not None else sample

    def __getitem__(self, item):
        try:
            return self._get(item)
        except INPUT_ERRORS as e:
            if self.carry_errors and get_worker_info() is not None:
                return CarriedError(e)
            raise

    def _get(self, item):
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
