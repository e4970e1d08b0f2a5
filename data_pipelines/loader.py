"""Rank-aware batching of an in-memory dataset, reproducible from (seed, epoch, position).

Every random choice is drawn from a generator seeded by a hash of where it is used (the epoch's
shuffle; each batch's augmentation), never from a generator carried along between batches. So
batch k of epoch e is the same whether the epoch is iterated from its start or resumed at k,
and no random state needs to be checkpointed besides (seed, epoch, batch).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from .transforms import CropFlip, Normalize

__all__ = ["BatchLoader", "derive_seed"]

# Stream tags: keep the shuffle and the augmentation draws independent for equal keys.
_SHUFFLE = 0
_AUGMENT = 1


def derive_seed(*keys: int) -> int:
    """A 63-bit seed for ``torch.Generator.manual_seed``, hashed from integer ``keys``.

    numpy's ``SeedSequence`` mixes the keys well (nearby epochs or batch indices give unrelated
    streams) and is the same on every platform; negative keys are taken modulo 2**64.
    """
    state = np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


class BatchLoader:
    """Yields ``(x, y)`` batches of ONE rank: x float32 (B, *input_shape) normalised, y int64 (B,).

    Training (``train=True``): each epoch a fresh permutation of all samples (seeded by
    (seed, epoch)), trimmed to ``world_size * (num_samples // world_size)`` so every rank gets
    as many samples; rank r takes ``perm[r::world_size]`` and drops its last partial batch, so
    ``len = (num_samples // world_size) // batch_size`` on every rank. Augmentation of batch k
    is seeded by (seed, epoch, k, rank).

    Evaluation (``train=False``): no shuffle, no augmentation, nothing dropped or duplicated:
    rank r gets samples r, r + W, r + 2W, ... in order; counts may differ by one between ranks
    and the last batch may be smaller. Summing per-rank correct counts gives the exact metric.

    Batches are CPU tensors; the caller moves them to its device.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        normalize: Normalize,
        train: bool = False,
        augment: CropFlip | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """``images`` (N, *shape) uint8 or float32, ``labels`` (N,) int64, kept by reference."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size} must be >= 1")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.normalize = normalize
        self.train = train
        self.augment = augment if train else None
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_samples: int = len(labels)
        if train:
            self._len = (self.num_samples // world_size) // batch_size
        else:
            self._len = math.ceil(len(range(rank, self.num_samples, world_size)) / batch_size)
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        """Batches per epoch for this rank (the full epoch, whatever ``start_batch`` is)."""
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration yield epoch ``epoch`` from batch ``start_batch`` on.

        Resuming mid-epoch this way yields exactly the batches an uninterrupted epoch yields
        from ``start_batch`` on; the skipped batches are never assembled.
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} must be in [0, {len(self)}]")
        self.epoch = epoch
        self.start_batch = start_batch

    def indices(self, epoch: int) -> torch.Tensor:
        """int64 (len(self) * batch_size,) or fewer: the sample indices this rank visits in
        ``epoch``, in order (training: after trimming and dropping the last partial batch)."""
        if not self.train:
            return torch.arange(self.rank, self.num_samples, self.world_size)
        perm = torch.randperm(self.num_samples, generator=_generator(self.seed, _SHUFFLE, epoch))
        per_rank = self.num_samples // self.world_size
        mine = perm[self.rank : per_rank * self.world_size : self.world_size]
        return mine[: self._len * self.batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate the current epoch from ``start_batch``; the next iteration starts at batch 0."""
        epoch, start = self.epoch, self.start_batch
        self.start_batch = 0  # reset now, so an iteration abandoned half-way does not leak
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices(epoch)
        for k in range(start, len(self)):
            sel = order[k * self.batch_size : (k + 1) * self.batch_size]
            x = self.images[sel]  # one gather from the preloaded tensor: (B, *shape)
            if self.augment is not None:
                x = self.augment(x, _generator(self.seed, _AUGMENT, epoch, k, self.rank))
            yield self.normalize(x), self.labels[sel]
