"""``BatchLoader``: rank-aware batching of an in-memory dataset, reproducible from (seed, epoch,
position); the sharding, resume and seeding rules are ``ShardedLoader``'s (``sharding.py``)."""

from __future__ import annotations

import math
from typing import Iterator

import torch

from .sharding import ShardedLoader, derive_seed
from .transforms import CropFlip, Normalize

__all__ = ["BatchLoader"]

# derive_seed stream tag of the augmentation draws (the shuffle's is ShardedLoader's 0).
_AUGMENT = 1


class BatchLoader(ShardedLoader):
    """Yields ``(x, y)`` batches of ONE rank: x float32 (B, *input_shape) normalised, y int64 (B,).

    Training (``train=True``): each epoch a fresh permutation of all samples (seeded by
    (seed, epoch)), sharded and resumable as ``ShardedLoader`` says (``len = (num_samples //
    world_size) // batch_size`` on every rank); the augmentation of batch k is seeded by (seed,
    epoch, k, rank). Evaluation (``train=False``): no shuffle, no augmentation; rank r gets
    samples r, r + W, r + 2W, ... in order.

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
        """``images`` (N, *shape) uint8 or float32, ``labels`` (N,) int64, kept by reference.
        Raises ``ValueError`` for a bad rank or batch size, or unequal counts."""
        super().__init__(len(labels), batch_size, train=train, seed=seed, rank=rank, world_size=world_size)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.normalize = normalize
        self.augment = augment if train else None

    def _batches(self, epoch: int, first: int, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b = self.batch_size
        for j in range(math.ceil(len(order) / b)):
            k = first + j  # the batch's index in the epoch (its augmentation seed)
            sel = order[j * b: (j + 1) * b]
            x = self.images[sel]  # one gather from the preloaded tensor: (B, *shape)
            if self.augment is not None:
                gen = torch.Generator().manual_seed(derive_seed(self.seed, _AUGMENT, epoch, k, self.rank))
                x = self.augment(x, gen)
            yield self.normalize(x), self.labels[sel]
