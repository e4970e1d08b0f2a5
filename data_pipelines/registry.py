"""Dataset registry: ``@register_dataset(name)`` functions load a dataset into memory by name.

A registered function takes the ``DataConfig`` and returns a ``DatasetSpec``: the raw train and
test tensors plus how to normalise and augment them. The loaders (``build_loaders``) do the rest,
so a new in-memory dataset is one function.

Datasets too large for memory (ImageNet) register with ``@register_loaders(name)`` instead: a
function ``fn(cfg, seed, rank, world_size) -> Loaders`` that builds its own file-based loaders
(``ShardedLoader``s, as ``BatchLoader``). Both kinds share one namespace of ``--data`` names.

``DATASETS`` holds what a model needs to know of each named dataset (``DatasetInfo``: class
count, input shape), for tools that build a model without loading the data (``itop-inspect``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

from .errors import DataError
from .transforms import CropFlip

if TYPE_CHECKING:  # only for annotations: config imports this module
    from .build import Loaders
    from .config import DataConfig

__all__ = [
    "DATASETS",
    "DatasetFn",
    "DatasetInfo",
    "DatasetSpec",
    "LoadersFn",
    "check_dataset",
    "get_dataset_fn",
    "get_loaders_fn",
    "list_datasets",
    "register_dataset",
    "register_loaders",
]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: class count and per-sample input shape."""

    num_classes: int
    input_shape: tuple[int, ...]


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(10, (1, 28, 28)),
    "cifar10": DatasetInfo(10, (3, 32, 32)),
    "cifar100": DatasetInfo(100, (3, 32, 32)),
    "imagenet": DatasetInfo(1000, (3, 224, 224)),  # at the recipe's --image-size 224
    # scikit-learn's bundled 8x8 digits (64 features, integer values 0..16): a tiny CPU dataset.
    "digits": DatasetInfo(10, (1, 8, 8)),
}


@dataclass
class DatasetSpec:
    """A dataset held in memory, as a registered function returns it.

    train_x / test_x: (N, *info.input_shape) images, uint8 in 0..255 (scaled by 1/255 like
        torchvision's ``ToTensor`` before normalising) or float32 (normalised as they are).
    train_y / test_y: (N,) int64 labels in [0, info.num_classes).
    info: class count and per-sample input shape (``DATASETS`` for the named datasets).
    mean / std: per-channel normalisation, in the units after the 1/255 scaling of uint8 data.
    augment: training augmentation, or None.
    valid_split: the reference default of ``--valid-split`` for this dataset.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    info: DatasetInfo
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: CropFlip | None = None
    valid_split: float = 0.0

    def check(self, name: str) -> None:
        """Raise ``DataError`` naming the dataset if tensors disagree with ``info``.

        Catches files that torchvision reads without complaint but that hold the wrong thing
        (another dataset's files, labels out of range), before a training run trips on them.
        """
        channels = self.info.input_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise DataError(f"--data {name}: mean/std need {channels} channel values")
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            where = f"--data {name}: {split} split"
            if x.dtype not in (torch.uint8, torch.float32) or tuple(x.shape[1:]) != self.info.input_shape:
                raise DataError(f"{where} has {x.dtype} images of shape {tuple(x.shape[1:])}, "
                                 f"expected uint8/float32 of shape {self.info.input_shape}")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise DataError(f"{where} has {y.dtype} labels of shape {tuple(y.shape)} "
                                 f"for {x.shape[0]} images, expected int64 ({x.shape[0]},)")
            if len(y) and not (0 <= int(y.min()) and int(y.max()) < self.info.num_classes):
                raise DataError(f"{where} has labels outside [0, {self.info.num_classes})")


DatasetFn = Callable[["DataConfig"], DatasetSpec]
F = TypeVar("F", bound=DatasetFn)
# fn(cfg, seed, rank, world_size) -> Loaders, for datasets read from files batch by batch.
LoadersFn = Callable[["DataConfig", int, int, int], "Loaders"]
L = TypeVar("L", bound=LoadersFn)

_REGISTRY: dict[str, DatasetFn] = {}
_LOADERS: dict[str, LoadersFn] = {}


def _register(table: dict, name: str) -> Callable:
    """A decorator storing its function in ``table`` under ``name``; ``ValueError`` if either
    kind of dataset already has the name (they share the ``--data`` names)."""

    def decorator(fn):
        if name in _REGISTRY or name in _LOADERS:
            raise ValueError(f"Dataset {name!r} is already registered")
        table[name] = fn
        return fn

    return decorator


def register_dataset(name: str) -> Callable[[F], F]:
    """Decorator: register ``fn(cfg: DataConfig) -> DatasetSpec`` as ``--data name``.

    Raises ``ValueError`` if the name is taken.
    """
    return _register(_REGISTRY, name)


def register_loaders(name: str) -> Callable[[L], L]:
    """Decorator: register ``fn(cfg, seed, rank, world_size) -> Loaders`` as ``--data name``.

    For file-based datasets that build their own loaders (ImageNet). Raises ``ValueError`` if
    the name is taken by either kind of dataset.
    """
    return _register(_LOADERS, name)


def list_datasets() -> list[str]:
    """Sorted names of every registered dataset (the choices of ``--data``)."""
    return sorted(set(_REGISTRY) | set(_LOADERS))


def check_dataset(name: str) -> None:
    """``ValueError`` naming ``--data`` and listing the known names unless ``name`` is registered."""
    if name not in _REGISTRY and name not in _LOADERS:
        raise DataError(f"--data: unknown dataset {name!r}; known: {', '.join(list_datasets())}")


def get_dataset_fn(name: str) -> DatasetFn:
    """The in-memory function registered as ``name``; ``ValueError`` naming ``--data`` if none is."""
    check_dataset(name)
    if name not in _REGISTRY:
        raise DataError(f"--data: {name!r} is read from files, not loaded into memory; "
                         f"use build_loaders")
    return _REGISTRY[name]


def get_loaders_fn(name: str) -> LoadersFn | None:
    """The loader builder registered as ``name`` with ``register_loaders``, or None."""
    return _LOADERS.get(name)
