"""Data loaders of itop_dist (torchvision, scikit-learn digits, DALI, synthetic).

The small datasets live in memory as tensors and are batched by ``BatchLoader``, rank-aware,
with vectorised per-batch augmentation; everything random derives from (seed, epoch, batch), so
a run resumed mid-epoch sees exactly the batches of an uninterrupted run::

    loaders = build_loaders(DataConfig(name="cifar10", data_dir="data"), seed=17,
                            rank=accelerator.process_index, world_size=accelerator.num_processes)
    for epoch in range(epochs):
        loaders.train.set_epoch(epoch)
        for x, y in loaders.train: ...

Datasets plug in by name with ``@register_dataset(name)``; see ``list_datasets()``.
"""

from __future__ import annotations

# Importing the module registers the built-in datasets.
from . import datasets  # noqa: F401
from .build import Loaders, build_loaders
from .config import DataConfig
from .loader import BatchLoader
from .registry import DatasetSpec, list_datasets, register_dataset
from .transforms import CropFlip, Normalize

__all__ = [
    "BatchLoader",
    "CropFlip",
    "DataConfig",
    "DatasetSpec",
    "Loaders",
    "Normalize",
    "build_loaders",
    "list_datasets",
    "register_dataset",
]
