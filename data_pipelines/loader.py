"""Rank-aware batching of an in-memory dataset, reproducible from (seed, epoch, position).

Every random choice is drawn from a generator seeded by a hash of where it is used (the epoch's
shuffle; each batch's augmentation), never from a generator carried along between batches. So
batch k of epoch e is the same whether the epoch is iterated from its start or resumed at k,
and no random state needs to be checkpointed besides (seed, epoch, batch).
"""

from __future__ import annotations

import math
import operator
from typing import Iterator

import numpy as np
import torch

from .transforms import CropFlip, Normalize

__all__ = ["BatchLoader", "check_start_sample", "derive_seed", "train_batches", "train_positions",
           "train_shard"]

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


# ---------------------------------------------------------------------------------------------
# The training sharding rule, shared by every loader (BatchLoader, ImageNet torchvision, DALI)
#
# An epoch is a permutation of the N samples (its "positions" 0 .. N-1). With W processes of
# B samples a batch, global step j consumes positions [j*B*W, (j+1)*B*W) and rank r takes
# positions j*B*W + r + i*W, i = 0 .. B-1, of them (strided). So the first k steps of
# all ranks together consume exactly positions [0, k*B*W), whatever W and B are, and an epoch
# interrupted after s global samples resumes, under any other W' and B', at position s:
# rank r takes s + r, s + r + W', ... A pass drops the final partial global step (fewer than
# B*W positions left): every rank yields the same number of full batches.


def check_start_sample(start_sample: int, num_samples: int) -> int:
    """``start_sample`` as an int; a one-line ``ValueError`` unless it is an integer in
    [0, num_samples]."""
    try:
        s = operator.index(start_sample)  # int, numpy or 0-d integer tensor; not 1.5 or "3"
    except TypeError:
        s = None
    if s is None or isinstance(start_sample, bool) or not 0 <= s <= num_samples:
        raise ValueError(f"start_sample {start_sample!r} must be an integer in [0, {num_samples}] "
                         f"(the global training samples of this epoch consumed before the resume)")
    return s


def train_batches(num_samples: int, batch_size: int, world_size: int, start_sample: int = 0) -> int:
    """Full batches every rank yields from global position ``start_sample`` to the epoch's end:
    ``(N - start_sample) // (B * W)``; with ``start_sample`` 0 the epoch's ``(N // W) // B``."""
    start_sample = check_start_sample(start_sample, num_samples)
    return (num_samples - start_sample) // (batch_size * world_size)


def train_positions(num_samples: int, batch_size: int, rank: int, world_size: int,
                    start_sample: int = 0) -> range:
    """Permutation positions rank ``rank`` of ``world_size`` visits, in order, from global
    position ``start_sample`` on: ``start_sample + rank + W*i`` for
    i < ``train_batches(...) * batch_size`` (THE training sharding rule of all loaders)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    start_sample = check_start_sample(start_sample, num_samples)
    step = batch_size * world_size
    end = start_sample + train_batches(num_samples, batch_size, world_size, start_sample) * step
    return range(start_sample + rank, end, world_size)


def train_shard(order: torch.Tensor, batch_size: int, rank: int, world_size: int,
                start_sample: int = 0) -> torch.Tensor:
    """The entries of an epoch's permutation ``order`` (all N samples) that ``rank`` visits from
    ``start_sample`` on, in order: ``order[train_positions(len(order), ...)]``, a view."""
    pos = train_positions(len(order), batch_size, rank, world_size, start_sample)
    return order[pos.start: pos.stop: pos.step]


class BatchLoader:
    """Yields ``(x, y)`` batches of ONE rank: x float32 (B, *input_shape) normalised, y int64 (B,).

    Training (``train=True``): each epoch a fresh permutation of all samples (seeded by
    (seed, epoch)); rank r takes positions r, r + W, r + 2W, ... (``train_shard``) and the
    final partial global batch is dropped, so ``len = (num_samples // world_size) // batch_size``
    on every rank. Augmentation of batch k is seeded by (seed, epoch, k, rank).
    ``set_epoch(e, start_sample=s)`` resumes after s global samples of the epoch, under any
    world size and batch size (see ``set_epoch``).

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
            self._len = train_batches(self.num_samples, batch_size, world_size)  # (N // W) // B
        else:
            self._len = math.ceil(len(range(rank, self.num_samples, world_size)) / batch_size)
        self.epoch = 0
        self.start_batch = 0
        self.start_sample = 0

    def __len__(self) -> int:
        """Batches per epoch for this rank (the full epoch, whatever ``set_epoch`` started at)."""
        return self._len

    @property
    def samples_per_epoch(self) -> int:
        """Global samples (all ranks together) a full training epoch consumes: len * B * W."""
        return self._len * self.batch_size * self.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0, *, start_sample: int | None = None) -> None:
        """Make the next iteration yield epoch ``epoch`` from ``start_batch`` or ``start_sample`` on.

        ``start_batch=k``: from this rank's batch k; exactly the batches an uninterrupted epoch
        yields from k on (training: the same as ``start_sample=k*B*W``).

        ``start_sample=s`` (training; keyword only, not with ``start_batch``): resume an epoch
        of which s GLOBAL samples (all ranks together, permutation positions [0, s)) were
        consumed, possibly under another world size or batch size. Rank r yields positions
        s + r, s + r + W, ... in ``batches_left()`` = (N - s) // (B*W) full batches (the final
        partial global batch dropped), the same count on every rank; batch j of them is
        augmented as batch ``s // (B*W) + j``. s must be in [0, num_samples]. The skipped
        batches are never assembled.
        """
        b, w = self.batch_size, self.world_size
        if start_sample is not None:
            if start_batch != 0:
                raise ValueError(f"set_epoch: pass start_batch ({start_batch}) or start_sample "
                                 f"({start_sample}), not both")
            if not self.train and start_sample != 0:
                raise ValueError(f"start_sample {start_sample}: only training loaders resume by "
                                 f"global sample; an evaluation loader takes start_batch")
            start_sample = check_start_sample(start_sample, self.num_samples)
        elif not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} must be in [0, {len(self)}]")
        else:
            start_sample = start_batch * b * w if self.train else 0
        self.epoch = epoch
        self.start_sample = start_sample
        self.start_batch = start_sample // (b * w) if self.train else start_batch

    def batches_left(self) -> int:
        """Batches the next iteration yields on this rank (after ``set_epoch``); the same on
        every rank in training."""
        if self.train:
            return train_batches(self.num_samples, self.batch_size, self.world_size, self.start_sample)
        return len(self) - self.start_batch

    def indices(self, epoch: int, start_sample: int = 0) -> torch.Tensor:
        """int64: the sample indices this rank visits in ``epoch``, in order (training: from
        global position ``start_sample`` on, ``batches_left() * batch_size`` of them; with
        ``start_sample`` 0 the full epoch, len(self) * batch_size)."""
        if not self.train:
            return torch.arange(self.rank, self.num_samples, self.world_size)
        perm = torch.randperm(self.num_samples, generator=_generator(self.seed, _SHUFFLE, epoch))
        return train_shard(perm, self.batch_size, self.rank, self.world_size, start_sample)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate the current epoch from where ``set_epoch`` put it; the next iteration starts
        at the epoch's beginning."""
        epoch, start_sample, start_batch = self.epoch, self.start_sample, self.start_batch
        self.start_sample = self.start_batch = 0  # reset now: an abandoned iteration does not leak
        return self._batches(epoch, start_sample, start_batch)

    def _batches(self, epoch: int, start_sample: int, first: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b = self.batch_size
        if self.train:
            order = self.indices(epoch, start_sample)
        else:
            order = self.indices(epoch)[first * b:]
        for j in range(math.ceil(len(order) / b)):
            k = first + j  # the batch's index in the epoch (its augmentation seed)
            sel = order[j * b: (j + 1) * b]
            x = self.images[sel]  # one gather from the preloaded tensor: (B, *shape)
            if self.augment is not None:
                x = self.augment(x, _generator(self.seed, _AUGMENT, epoch, k, self.rank))
            yield self.normalize(x), self.labels[sel]
