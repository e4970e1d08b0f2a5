"""Model registry (timm-style): a decorator stores small constructors, ``create_model`` builds them.

Names are looked up case-insensitively, ignoring ``-``, ``_`` and ``.``, so ``ResNet-34``,
``resnet34`` and ``resnet_34`` are one model. Several constructors may share one normalised
name if they fit different datasets; the dataset then picks the variant (``resnet50`` on
``imagenet`` is torchvision's ResNet-50, on ``cifar10`` the GraNet/Sup-tickets CIFAR ResNet-50).
The dataset is only that key (spelt as ``--data`` names it, ``CIFAR-10`` = ``cifar10``): models
know nothing else of the data, so the class count is always given (``data_pipelines.DATASETS``
has each dataset's), and so is the input shape for the models that take it.

``timm/NAME`` is any timm model (``models.timm_models``): it fits every dataset, taking the
data's channels and image size from the input shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from torch import nn

from . import timm_models

__all__ = [
    "FsdpUnits",
    "ModelFn",
    "create_model",
    "list_models",
    "model_datasets",
    "model_fsdp_units",
    "register_model",
]


ModelFn = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFn)
# The model's FSDP units, each sharded on its own (a list: modules gathered together), in the
# order they run; what no unit holds (stem, classifier) stays with the root. See launcher/parallel.py.
FsdpUnits = Callable[[nn.Module], list[nn.Module | list[nn.Module]]]


@dataclass(frozen=True)
class _Entry:
    display_name: str
    datasets: tuple[str, ...]
    fn: ModelFn
    fsdp_units: FsdpUnits


# normalised name -> the variants registered under it (their dataset sets are disjoint).
_REGISTRY: dict[str, list[_Entry]] = {}

_IGNORED = re.compile(r"[-_.]")


def _normalise(name: str) -> str:
    return _IGNORED.sub("", name).lower()


def register_model(
    name: str, datasets: tuple[str, ...] | list[str], *, fsdp_units: FsdpUnits
) -> Callable[[F], F]:
    """Decorator: register ``fn(num_classes, **kwargs) -> nn.Module`` as ``name`` for ``datasets``,
    with ``fsdp_units(model)`` naming the blocks that sharded training shards one by one.

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
        variants.append(_Entry(name, resolved, fn, fsdp_units))
        return fn

    return decorator


def _variants(name: str) -> list[_Entry]:
    variants = _REGISTRY.get(_normalise(name))
    if not variants:
        raise ValueError(f"Unknown model {name!r}; known models: {', '.join(list_models())}")
    return variants


def list_models() -> list[str]:
    """Sorted display names of every registered model (one per variant name); any timm model
    is ``timm/NAME`` besides."""
    return sorted({e.display_name for variants in _REGISTRY.values() for e in variants})


def _variant(name: str, dataset: str) -> _Entry:
    variants = _variants(name)
    key = _normalise(dataset)
    for entry in variants:
        if key in entry.datasets:
            return entry
    raise ValueError(
        f"Model {variants[0].display_name!r} does not fit dataset {key!r}; "
        f"it fits: {', '.join(model_datasets(name))}"
    )


def model_datasets(name: str) -> tuple[str, ...]:
    """Datasets that ``name`` fits, across all its variants, sorted; ``()`` for a timm model,
    which fits every dataset. Raises ``ValueError`` for an unknown model (a timm one: naming
    the closest timm names)."""
    if timm_models.is_timm(name):
        timm_models.timm_name(name)
        return ()
    return tuple(sorted({d for e in _variants(name) for d in e.datasets}))


def create_model(name: str, dataset: str, *, num_classes: int,
                 input_shape: tuple[int, ...] | None = None, **kwargs: Any) -> nn.Module:
    """Build the variant of model ``name`` for ``dataset`` with ``num_classes`` outputs.

    Extra keyword arguments go to the constructor (``None`` values are dropped, as in timm),
    e.g. ``create_model("resnet50", "imagenet", num_classes=1000, init="classic")``. The model
    takes inputs of that dataset's shape, ``(B, *input_shape)``, and returns logits
    ``(B, num_classes)``. ``input_shape``: the data's ``(C, H, W)``, which a ``timm/NAME`` model
    takes as its ``in_chans`` and ``img_size`` (kwargs win; zoo models know their dataset's).
    Raises ``ValueError`` for an unknown model or one without a variant for ``dataset``.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if timm_models.is_timm(name):
        return timm_models.create_timm_model(name, num_classes, input_shape, **kwargs)
    return _variant(name, dataset).fn(num_classes, **kwargs)


def model_fsdp_units(name: str, dataset: str) -> FsdpUnits:
    """The FSDP units function of the variant of ``name`` for ``dataset`` (as ``create_model``
    picks it): call it on a model ``create_model`` built. Raises ``ValueError`` as ``create_model``."""
    if timm_models.is_timm(name):
        return timm_models.fsdp_units
    return _variant(name, dataset).fsdp_units
