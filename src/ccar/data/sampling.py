"""Re-sampling for long tails: which classes an epoch's draws come from (Kang et al. 2020 and the papers before it).

- ``instance``: every sample once per epoch, shuffled (no re-sampling; the default);
- ``class-balanced``: every class equally likely;
- ``sqrt``: class probability proportional to n_c^(1/2);
- ``progressive``: at epoch t of T, (1 - t/T) * n_c / sum(n) + (t/T) / C, from instance- to class-balanced.

Re-sampled epochs keep their length: N draws with replacement (a class is drawn from the probabilities above, then
a sample uniformly within it). With ``sampler_epoch`` = k, epochs before k use instance sampling and the chosen
sampler from k on (deferred re-sampling). The index sequence of an epoch depends only on (seed, epoch), so a
resumed run draws exactly what an uninterrupted one draws, and under data parallelism every rank draws the same
global sequence and takes its own stride: the shards are disjoint and their union is the single-process sequence.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..errors import DataError

SAMPLERS = ("instance", "class-balanced", "sqrt", "progressive")


def class_sampling_probs(class_counts: Sequence[int], sampler: str, epoch: int = 0, epochs: int = 1) -> np.ndarray:
    """Per-class draw probabilities (float64, summing to 1) of ``sampler`` at 0-based ``epoch`` of ``epochs``.

    >>> class_sampling_probs([90, 10], "instance").tolist()
    [0.9, 0.1]
    >>> class_sampling_probs([90, 10], "class-balanced").tolist()
    [0.5, 0.5]
    >>> class_sampling_probs([90, 10], "sqrt").round(4).tolist()
    [0.75, 0.25]
    >>> class_sampling_probs([90, 10], "progressive", epoch=5, epochs=10).tolist()
    [0.7, 0.3]
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    if counts.ndim != 1 or len(counts) == 0 or not np.all(np.isfinite(counts)) or np.any(counts < 0) or counts.sum() <= 0:
        raise DataError(f"class_counts must be a non-empty list of non-negative counts, got {list(class_counts)[:10]}")
    if sampler not in SAMPLERS:
        raise DataError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    present = (counts > 0).astype(np.float64)  # a class without samples is never drawn
    instance = counts / counts.sum()
    balanced = present / present.sum()
    if sampler == "instance":
        probs = instance
    elif sampler == "class-balanced":
        probs = balanced
    elif sampler == "sqrt":
        probs = np.sqrt(counts) / np.sqrt(counts).sum()
    else:
        if epochs < 1 or not 0 <= epoch <= epochs:
            raise DataError(f"progressive sampling needs 0 <= epoch <= epochs, got epoch {epoch} of {epochs}")
        t = epoch / epochs
        probs = (1.0 - t) * instance + t * balanced
    return probs / probs.sum()


class ClassSampler:
    """The global index sequence of every epoch for the training split with ``targets``.

    >>> s = ClassSampler(torch.tensor([0, 0, 0, 1]), "class-balanced", seed=0)
    >>> idx = s.indices(0)
    >>> len(idx), set(idx.tolist()) <= {0, 1, 2, 3}
    (4, True)
    """

    def __init__(self, targets: torch.Tensor, sampler: str = "instance", sampler_epoch: int = 0, epochs: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.targets = torch.as_tensor(targets).cpu().long()
        self.sampler, self.sampler_epoch, self.epochs, self.seed, self.shuffle = sampler, sampler_epoch, epochs, seed, shuffle
        if sampler not in SAMPLERS:
            raise DataError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        counts = torch.bincount(self.targets) if len(self.targets) else torch.zeros(0, dtype=torch.long)
        self.counts = counts
        self.order = torch.argsort(self.targets, stable=True)  # sample positions grouped by class
        self.starts = torch.cumsum(counts, 0) - counts

    def active(self, epoch: int) -> str:
        """The sampler in force at ``epoch``: instance sampling before ``sampler_epoch``."""
        return self.sampler if epoch >= self.sampler_epoch else "instance"

    def indices(self, epoch: int) -> torch.Tensor:
        """Positions into the split for ``epoch`` (length N): a permutation, or N draws with replacement."""
        n = len(self.targets)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        sampler = self.active(epoch)
        if sampler == "instance":
            return torch.randperm(n, generator=g)
        probs = torch.from_numpy(class_sampling_probs(self.counts.tolist(), sampler, epoch, self.epochs))
        classes = torch.multinomial(probs, n, replacement=True, generator=g)
        size = self.counts[classes]
        within = (torch.rand(n, generator=g, dtype=torch.float64) * size).long().clamp_max(size - 1)
        return self.order[self.starts[classes] + within]


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's stride of a global sequence, padded (like ``DistributedSampler``) to a multiple of the world size."""
    if world_size <= 1:
        return indices
    n = len(indices)
    total = math.ceil(n / world_size) * world_size
    return torch.cat([indices, indices[: total - n]])[rank::world_size]


class EpochSampler(torch.utils.data.Sampler):
    """A ``DataLoader`` sampler yielding this rank's shard of :class:`ClassSampler`'s sequence; call ``set_epoch``.

    Each index comes as ``epoch * N + i`` (N samples): the dataset takes ``i`` and seeds that sample's augmentation
    with the epoch -- a fresh crop every epoch even in persistent workers, the same for any number of workers.
    ``skip_next(n)``: the next epoch's iteration starts after its first ``n`` indices (a run resumed mid-epoch)."""

    def __init__(self, sampler: ClassSampler, rank: int = 0, world_size: int = 1):
        self.sampler, self.rank, self.world_size, self.epoch, self.skip = sampler, rank, world_size, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, n: int) -> None:
        self.skip = n

    def __len__(self) -> int:
        return math.ceil(len(self.sampler.targets) / self.world_size)

    def __iter__(self):
        order = shard(self.sampler.indices(self.epoch), self.rank, self.world_size)[self.skip:]
        self.skip = 0
        return iter((order + self.epoch * len(self.sampler.targets)).tolist())
