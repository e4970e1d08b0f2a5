"""``build_loaders``: the train / validation / test loaders of one rank, from a ``DataConfig``."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from .errors import DataError
from .config import DataConfig
from .loader import BatchLoader
from .registry import DatasetSpec, get_dataset_fn, get_loaders_fn
from .sharding import ShardedLoader, check_rank
from .transforms import Normalize

__all__ = ["Loaders", "build_loaders", "check_loaders", "train_valid_cut"]

log = logging.getLogger("itop_dist.data")


@dataclass
class Loaders:
    """The loaders of one rank and what the model needs to know about the data.

    val is None when the validation split is 0 (CIFAR-100, digits by default: REF then selects
    on the test set). In-memory datasets give ``BatchLoader``s, file-based ones (ImageNet)
    their own ``ShardedLoader``s.
    """

    train: ShardedLoader
    val: ShardedLoader | None
    test: ShardedLoader
    num_classes: int
    input_shape: tuple[int, ...]


def train_valid_cut(num_samples: int, valid_split: float) -> int:
    """Training samples kept when the last ``valid_split`` of ``num_samples`` is held out.

    REF's formula (``DatasetSplitter``): ``floor((1 - valid_split) * N)``; CIFAR-10's 0.1 of
    50 000 gives the first 45 000 for training.
    """
    return int(math.floor((1.0 - valid_split) * num_samples))


def build_loaders(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> Loaders:
    """Load dataset ``cfg.name`` into memory and batch it for global ``rank`` of ``world_size``.

    ``seed`` (the run's ``--seed``) drives the training shuffle and augmentation; the
    train/validation split is fixed (first part / last part) and does not depend on it.
    Raises ``ValueError`` naming the flag for files that are missing or corrupt, a validation
    split that leaves a part empty, or a ``--batch-size`` larger than a rank's share.
    """
    check_rank(rank, world_size)  # before loading anything
    from_files = get_loaders_fn(cfg.name)
    if from_files is not None:  # read batch by batch from disk (ImageNet)
        return from_files(cfg, seed, rank, world_size)
    spec = get_dataset_fn(cfg.name)(cfg)
    spec.check(cfg.name)
    split = spec.valid_split if cfg.valid_split is None else cfg.valid_split
    cut = train_valid_cut(len(spec.train_y), split)
    if cut == 0 or (split > 0 and cut == len(spec.train_y)):
        raise DataError(f"--valid-split: {split} of {len(spec.train_y)} training samples leaves "
                         f"an empty part; choose a value further from 0 or 1")
    if cut // world_size < cfg.batch_size:
        raise DataError(f"--batch-size: {cfg.batch_size} per process x {world_size} processes exceeds "
                         f"the {cut} training samples; use a smaller batch")

    def loader(x: torch.Tensor, y: torch.Tensor, train: bool) -> BatchLoader:
        return BatchLoader(
            x, y, cfg.batch_size if train else cfg.test_batch_size,
            normalize=_normalize(spec), train=train, augment=spec.augment if cfg.augment else None,
            seed=seed, rank=rank, world_size=world_size,
        )

    # Slices are views: the held-out part shares the preloaded training tensor.
    return Loaders(
        train=loader(spec.train_x[:cut], spec.train_y[:cut], train=True),
        val=loader(spec.train_x[cut:], spec.train_y[cut:], train=False) if split > 0 else None,
        test=loader(spec.test_x, spec.test_y, train=False),
        num_classes=spec.info.num_classes,
        input_shape=spec.info.input_shape,
    )


def check_loaders(loaders: Loaders, train: bool = False) -> int:
    """Pre-flight before training: the file headers of the loaders read from files (ImageNet),
    so that a bad file stops the run now, not after an epoch (``--check-data``: ``train``).

    Every rank checks the whole evaluation split(s) (test, and val if any): the same files
    on every rank, so all ranks raise the same ``DataError`` together, before any collective.
    With ``train`` each rank also checks its 1/W of the training split (files rank, rank + W,
    ...; 1.28M files are too many to read W times): a bad file stops the rank that found it.
    Loaders without files (the in-memory datasets) are skipped. Returns the files checked;
    raises a one-line ``DataError`` naming the first bad file.
    """
    start, n = time.perf_counter(), 0
    for loader, shard in ((loaders.test, False), (loaders.val, False), (loaders.train if train else None, True)):
        check = getattr(loader, "check_files", None)
        if check is not None:
            n += check(shard=shard)
    if n:
        log.info("pre-flight: %d file headers checked in %.1f s", n, time.perf_counter() - start)
    return n


def _normalize(spec: DatasetSpec) -> Normalize:
    return Normalize(spec.mean, spec.std, spec.train_x.dtype, sample_dims=len(spec.info.input_shape))
