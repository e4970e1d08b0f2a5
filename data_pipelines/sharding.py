"""THE sharding rule of every loader, and ``ShardedLoader``, the base class that applies it.

An epoch is a sequence of the N samples (its "positions" 0 .. N-1): for training a permutation
seeded by (seed, epoch), the same on every rank; for evaluation the samples in order. Rank r
of W takes positions r, r + W, r + 2W, ... (strided):

* training: with B samples a batch, global step j consumes positions [j*B*W, (j+1)*B*W) and
  rank r takes positions j*B*W + r + i*W, i = 0 .. B-1, of them. So the first k steps of all
  ranks together consume exactly positions [0, k*B*W), whatever W and B are, and an epoch
  interrupted after s global samples resumes, under any other W' and B', at position s: rank
  r takes s + r, s + r + W', ... A pass drops the final partial global step (fewer than B*W
  positions left): every rank yields the same number of full batches.
* evaluation: nothing dropped or duplicated; counts differ by at most one between ranks and
  the last batch may be smaller. Summing per-rank counts counts every sample exactly once.

Every random choice is drawn from a generator seeded by a hash of where it is used
(``derive_seed``), never from a generator carried along between batches, so batch k of epoch
e is the same whether the epoch is iterated from its start or resumed at k, and nothing
besides (seed, epoch, position) needs to be checkpointed.
"""

from __future__ import annotations

import math
import operator
from typing import Iterator

import numpy as np
import torch

__all__ = ["ShardedLoader", "check_rank", "check_start_sample", "derive_seed", "train_batches", "train_positions",
           "train_shard"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed for ``torch.Generator.manual_seed``, hashed from integer ``keys``.

    numpy's ``SeedSequence`` mixes the keys well (nearby epochs or batch indices give unrelated
    streams) and is the same on every platform; negative keys are taken modulo 2**64.
    """
    state = np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(1, np.uint64)
    return int(state[0]) >> 1


def check_rank(rank: int, world_size: int) -> None:
    """A one-line ``ValueError`` unless 0 <= rank < world_size."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")


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
    i < ``train_batches(...) * batch_size`` (the training sharding rule)."""
    check_rank(rank, world_size)
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


class ShardedLoader:
    """Batches of ONE rank over N samples, by the strided rule above; subclasses turn sample
    indices into ``(x, y)`` batches (``_batches``).

    ``len(loader)``: batches per epoch of this rank (training: ``(N // W) // B`` on every rank;
    evaluation: ``ceil(len(range(r, N, W)) / B)``). ``set_epoch(e, start_batch=k)`` or
    ``set_epoch(e, start_sample=s)`` positions the next iteration; ``batches_left()`` says how
    many batches it yields; ``indices(e)`` lists its samples. The skipped batches of a resume
    are never assembled.
    """

    # Stream tag of derive_seed for the epoch's permutation (a subclass keeps its own, so that
    # its runs, and their mid-epoch checkpoints, keep their sample order).
    shuffle_stream = 0

    def __init__(self, num_samples: int, batch_size: int, *, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        """Raises ``ValueError`` unless 0 <= rank < world_size and batch_size >= 1."""
        check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size} must be >= 1")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        if train:
            self._len = train_batches(num_samples, batch_size, world_size)  # (N // W) // B
        else:
            self._len = math.ceil(len(range(rank, num_samples, world_size)) / batch_size)
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
        s + r, s + r + W, ... in ``batches_left()`` = (N - s) // (B*W) full batches, the same
        count on every rank; the first of them has index ``s // (B*W)`` in the epoch (what the
        subclasses seed its augmentation with). s must be in [0, num_samples].

        Raises a one-line ``ValueError`` for a start out of range, both starts, or a
        ``start_sample`` other than 0 on an evaluation loader.
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
        ``start_sample`` 0 the full epoch, len(self) * batch_size; evaluation: its whole
        shard r, r + W, ...)."""
        if not self.train:
            return torch.arange(self.num_samples)[self.rank::self.world_size]  # empty when N <= r
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.shuffle_stream, epoch))
        perm = torch.randperm(self.num_samples, generator=gen)
        return train_shard(perm, self.batch_size, self.rank, self.world_size, start_sample)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate the current epoch from where ``set_epoch`` put it; the next iteration starts
        at the epoch's beginning."""
        epoch, start_sample, first = self.epoch, self.start_sample, self.start_batch
        self.start_sample = self.start_batch = 0  # reset now: an abandoned iteration does not leak
        if self.train:
            order = self.indices(epoch, start_sample)
        else:
            order = self.indices(epoch)[first * self.batch_size:]
        return self._batches(epoch, first, order)

    def _batches(self, epoch: int, first: int, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the samples ``order`` as batches of ``batch_size`` (evaluation: the last may
        be smaller); ``first`` is the epoch's index of the first batch."""
        raise NotImplementedError
