"""Model registry (timm-style): a decorator stores small constructors, ``create_model`` builds them.

Names are looked up case-insensitively, ignoring ``-``, ``_`` and ``.``, so ``ResNet-34``,
``resnet34`` and ``resnet_34`` are one model. Several constructors may share one normalised
name if they fit different datasets; the dataset then picks the variant (``resnet50`` on
``imagenet`` is torchvision's ResNet-50, on ``cifar10`` the GraNet/Sup-tickets CIFAR ResNet-50).
The dataset is only that key (spelt as ``--data`` names it, ``CIFAR-10`` = ``cifar10``): models
know nothing else of the data, so the class count is always given (``data_pipelines.DATASETS``
has each dataset's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from torch import nn

__all__ = [
    "ModelFn",
    "create_model",
    "list_models",
    "model_datasets",
    "register_model",
]


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


def register_model(name: str, datasets: tuple[str, ...] | list[str]) -> Callable[[F], F]:
    """Decorator: register ``fn(num_classes, **kwargs) -> nn.Module`` as ``name`` for ``datasets``.

    Raises ``ValueError`` if a model with the same normalised name already fits one of
    ``datasets`` (the dataset would no longer pick a unique variant).
    """
    resolved = tuple(_normalise(d) for d in datasets)
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
    """Datasets that ``name`` fits, across all its variants, sorted."""
    return tuple(sorted({d for e in _variants(name) for d in e.datasets}))


def create_model(name: str, dataset: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the variant of model ``name`` for ``dataset`` with ``num_classes`` outputs.

    Extra keyword arguments go to the constructor (``None`` values are dropped, as in timm),
    e.g. ``create_model("resnet50", "imagenet", num_classes=1000, init="classic")``. The model
    takes inputs of that dataset's shape, ``(B, *input_shape)``, and returns logits
    ``(B, num_classes)``. Raises ``ValueError`` for an unknown model or one without a variant
    for ``dataset``.
    """
    variants = _variants(name)
    key = _normalise(dataset)
    for entry in variants:
        if key in entry.datasets:
            break
    else:
        raise ValueError(
            f"Model {variants[0].display_name!r} does not fit dataset {key!r}; "
            f"it fits: {', '.join(model_datasets(name))}"
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return entry.fn(num_classes, **kwargs)
