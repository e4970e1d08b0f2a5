"""Data loaders of itop_dist (torchvision, scikit-learn digits, DALI, synthetic).

The small datasets live in memory as tensors and are batched by ``BatchLoader``, rank-aware,
with vectorised per-batch augmentation; everything random derives from (seed, epoch, batch), so
a run resumed mid-epoch sees exactly the batches of an uninterrupted run::

    loaders = build_loaders(DataConfig(name="cifar10", data_dir="data"), seed=17,
                            rank=accelerator.process_index, world_size=accelerator.num_processes)
    for epoch in range(epochs):
        loaders.train.set_epoch(epoch)
        for x, y in loaders.train: ...

Datasets plug in by name with ``@register_dataset(name)``; see ``list_datasets()``. ImageNet
is read from its folder layout batch by batch, by NVIDIA DALI or torchvision
(``data_pipelines.imagenet``). Every loader is a ``ShardedLoader`` (``sharding.py``): one
strided sharding rule, the same ``len``, ``set_epoch`` and resume semantics. ``DATASETS``
gives the class count and input shape of each named dataset without loading it.

Data that cannot be used (missing or misplaced folders, unreadable or undecodable files) raises
``DataError`` (a ``ValueError``) with one line naming the path, also while a loader iterates;
``check_loaders(loaders, train=...)`` reads the headers of the file-based splits up front.
"""

from __future__ import annotations

# Importing the modules registers the built-in datasets.
from . import datasets, imagenet  # noqa: F401
from .build import Loaders, build_loaders, check_loaders
from .config import DataConfig
from .errors import DataError
from .loader import BatchLoader
from .registry import DATASETS, DatasetInfo, DatasetSpec, list_datasets, register_dataset, register_loaders
from .sharding import ShardedLoader
from .transforms import CropFlip, Normalize

__all__ = [
    "DATASETS",
    "BatchLoader",
    "CropFlip",
    "DataConfig",
    "DataError",
    "DatasetInfo",
    "DatasetSpec",
    "Loaders",
    "Normalize",
    "ShardedLoader",
    "build_loaders",
    "check_loaders",
    "list_datasets",
    "register_dataset",
    "register_loaders",
]
