"""Deterministic, resumable batching and per-sample seeded augmentation for training.

Everything random about the data is a pure function of ``(seed, epoch, index)``: the order of an
epoch depends on ``(seed, epoch)`` only, and the augmentation of one sample on ``(seed, epoch,
sample index)`` only. So a run resumed mid-epoch sees exactly the batches and crops the
uninterrupted run would have seen, whatever ``num_workers`` or world size is used.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter, defaultdict
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

SampleKey = tuple[int, int]  # (epoch, sample index): what the batch sampler yields per sample

# Separate streams so the epoch order and the per-sample augmentation never share a seed.
_ORDER_STREAM = 0
_AUGMENT_STREAM = 1


def mix_seed(*parts: int) -> int:
    """A well-spread 32-bit seed from integers (NumPy ``SeedSequence``, stable across versions)."""
    entropy = [int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]  # SeedSequence needs non-negative ints
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a function of ``(seed, epoch)`` only."""
    gen = torch.Generator().manual_seed(mix_seed(seed, _ORDER_STREAM, epoch))
    return torch.randperm(num_samples, generator=gen)


def grouped_chunks(groups: Sequence[int], chunk: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's chunks of ``chunk`` samples that share a group label, in a random order.

    Each group's samples are shuffled and cut into whole chunks (a group's remainder sits out this
    epoch, a different one each epoch); then the chunks are shuffled. A function of ``(seed, epoch)``.
    """
    gen = torch.Generator().manual_seed(mix_seed(seed, _ORDER_STREAM, epoch))
    members: dict[int, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    chunks = []
    for group in sorted(members):
        idx = members[group]
        order = torch.randperm(len(idx), generator=gen).tolist()
        chunks += [[idx[k] for k in order[c * chunk:(c + 1) * chunk]] for c in range(len(idx) // chunk)]
    return [chunks[c] for c in torch.randperm(len(chunks), generator=gen).tolist()]


class ResumableBatchSampler(Sampler[list[SampleKey]]):
    """Global batches of ``batch_size * world_size`` samples, sharded by rank, ``drop_last``.

    Batch ``s`` of an epoch is ``perm[s*G:(s+1)*G]`` with ``G = batch_size * world_size``; rank
    ``r`` takes the ``r``-th slice of ``batch_size`` of it. Each sample is yielded as its
    ``(epoch, index)`` key so the dataset can seed its augmentation without shared state.

    Args:
        num_samples: length of the training dataset (captions).
        batch_size: samples per process and step.
        world_size: number of processes.
        rank: this process.
        seed: order seed (the run seed; identical on every rank).
        groups: optional group label per sample (e.g. the scene class of its image). With
            ``groups_per_batch = K`` every global batch is K chunks of ``G / K`` samples of one group
            each (:func:`grouped_chunks`), so a sample meets ``G / K - 1`` negatives of its own group
            (a few in a random batch): hard negatives, e.g. the same scene with other details.
        groups_per_batch: K; needs ``groups`` and must divide the global batch.
    """

    def __init__(self, num_samples: int, batch_size: int, *, world_size: int = 1, rank: int = 0,
                 seed: int = 0, groups: Optional[Sequence[int]] = None, groups_per_batch: int = 0) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler setup: batch_size={batch_size}, world_size={world_size}, rank={rank}")
        if groups_per_batch:
            if groups is None or len(groups) != num_samples:
                raise ValueError("groups_per_batch needs one group label per sample")
            if groups_per_batch < 0 or (batch_size * world_size) % groups_per_batch:
                raise ValueError(f"groups_per_batch={groups_per_batch} must divide the global batch "
                                 f"{batch_size * world_size}")
        self.groups = list(groups) if groups_per_batch else None
        self.groups_per_batch = groups_per_batch
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_step = 0
        # whole chunks per epoch: the same every epoch (only which samples sit out changes)
        self._num_chunks = (sum(n // self.chunk for n in Counter(self.groups).values())
                            if self.groups is not None else 0)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Full steps per epoch (``drop_last``): what the lr schedule must count (method.md §7.16)."""
        if self.groups is None:
            return self.num_samples // self.global_batch
        return self._num_chunks // self.groups_per_batch

    @property
    def chunk(self) -> int:
        """Samples of one group in a row (``G / K``)."""
        return self.global_batch // self.groups_per_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch and skip its first ``start_step`` batches (mid-epoch resume)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch}")
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step  # batches the next iteration yields

    def __iter__(self) -> Iterator[list[SampleKey]]:
        if self.groups is None:
            perm = epoch_permutation(self.num_samples, self.seed, self.epoch).tolist()
        else:
            perm = [i for chunk in grouped_chunks(self.groups, self.chunk, self.seed, self.epoch) for i in chunk]
        g, b = self.global_batch, self.batch_size
        for step in range(self.start_step, self.steps_per_epoch):
            mine = perm[step * g + self.rank * b: step * g + (self.rank + 1) * b]
            yield [(self.epoch, i) for i in mine]


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG and Python's ``random`` inside the block and restore both after it,
    so per-sample seeding in the main process (``num_workers=0``) leaves the training RNG alone."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


class SeededDataset(Dataset):
    """Wrap a map-style dataset so item ``(epoch, i)`` is produced under an RNG seeded from
    ``(seed, epoch, i)``: torchvision's random transforms draw from torch's global RNG, and the
    right-angle rotation from Python's ``random``; both are seeded. Items are ``(*base[i], i)``:
    the sample index travels with the sample (the trainer's text-feature cache is indexed by it).

    Args:
        base: dataset indexed by sample index (e.g. :class:`harma.data.PairDataset`).
        seed: augmentation seed (the run seed; identical on every rank).
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> Any:
        epoch, index = key
        with seeded_rng(mix_seed(self.seed, _AUGMENT_STREAM, epoch, index)):
            return (*self.base[index], index)
