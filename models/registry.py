"""Model registry (timm-style): a decorator stores small constructors, ``create_model`` builds them.

Names are looked up case-insensitively, ignoring ``-``, ``_`` and ``.``, so ``ResNet-34``,
``resnet34`` and ``resnet_34`` are one model. Several constructors may share one normalised
name if they fit different datasets; the dataset then picks the variant (``resnet50`` on
``imagenet`` is torchvision's ResNet-50, on ``cifar10`` the GraNet/Sup-tickets CIFAR ResNet-50).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from torch import nn

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ModelFn",
    "create_model",
    "list_models",
    "model_datasets",
    "register_model",
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
    "imagenet": DatasetInfo(1000, (3, 224, 224)),
    # scikit-learn's bundled 8x8 digits (64 features, integer values 0..16): a tiny CPU dataset.
    "digits": DatasetInfo(10, (1, 8, 8)),
}

ModelFn = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFn)


@dataclass(frozen=True)
class _Entry:
    display_name: str
    datasets: tuple[str, ...]
    fn: ModelFn


# normalised name -> the variants registered under it (their dataset sets are disjoint).
_REGISTRY: dict[str, list[_Entry]] = {}

_IGNORED = re.compile(r"[-_.]")


def _normalise(name: str) -> str:
    return _IGNORED.sub("", name).lower()


def _resolve_dataset(dataset: str) -> str:
    """Map a dataset spelling (``CIFAR-10``, ``cifar10``) to its ``DATASETS`` key."""
    by_norm = {_normalise(k): k for k in DATASETS}
    key = by_norm.get(_normalise(dataset))
    if key is None:
        raise ValueError(f"Unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}")
    return key


def register_model(name: str, datasets: tuple[str, ...] | list[str]) -> Callable[[F], F]:
    """Decorator: register ``fn(num_classes, **kwargs) -> nn.Module`` as ``name`` for ``datasets``.

    Raises ``ValueError`` for an unknown dataset, or if a model with the same normalised name
    already fits one of ``datasets`` (the dataset would no longer pick a unique variant).
    """
    resolved = tuple(_resolve_dataset(d) for d in datasets)
    if not resolved:
        raise ValueError(f"Model {name!r} must fit at least one dataset")

    def decorator(fn: F) -> F:
        variants = _REGISTRY.setdefault(_normalise(name), [])
        for other in variants:
            clash = set(other.datasets) & set(resolved)
            if clash:
                raise ValueError(
                    f"Model {name!r} clashes with {other.display_name!r} on datasets {sorted(clash)}"
                )
        variants.append(_Entry(name, resolved, fn))
        return fn

    return decorator


def _variants(name: str) -> list[_Entry]:
    variants = _REGISTRY.get(_normalise(name))
    if not variants:
        raise ValueError(f"Unknown model {name!r}; known models: {', '.join(list_models())}")
    return variants


def list_models() -> list[str]:
    """Sorted display names of every registered model (one per variant name)."""
    return sorted({e.display_name for variants in _REGISTRY.values() for e in variants})


def model_datasets(name: str) -> tuple[str, ...]:
    """Datasets that ``name`` fits, across all its variants, in ``DATASETS`` order."""
    fits = {d for e in _variants(name) for d in e.datasets}
    return tuple(d for d in DATASETS if d in fits)


def create_model(
    name: str, dataset: str, num_classes: int | None = None, **kwargs: Any
) -> nn.Module:
    """Build model ``name`` for ``dataset``; ``num_classes`` defaults to the dataset's.

    Extra keyword arguments go to the constructor (``None`` values are dropped, as in timm),
    e.g. ``create_model("resnet50", "imagenet", init="classic")``. The model takes inputs of
    shape ``(B, *DATASETS[dataset].input_shape)`` and returns logits ``(B, num_classes)``.
    """
    variants = _variants(name)
    key = _resolve_dataset(dataset)
    for entry in variants:
        if key in entry.datasets:
            break
    else:
        raise ValueError(
            f"Model {variants[0].display_name!r} does not fit dataset {key!r}; "
            f"it fits: {', '.join(model_datasets(name))}"
        )
    if num_classes is None:
        num_classes = DATASETS[key].num_classes
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return entry.fn(num_classes, **kwargs)
