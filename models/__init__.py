"""Model zoo of itop_dist: plain single-device ``nn.Module``s returning logits.

Models know nothing about masks, sparsity or distribution; ``itop_dist`` decides which layers
are masked. Build one with ``create_model(name, dataset)``; see ``list_models()``.
"""

from __future__ import annotations

# Importing the architecture modules registers their models.
from . import alexnet, imagenet, mlp, resnet, vgg, wrn  # noqa: F401
from .registry import DATASETS, DatasetInfo, create_model, list_models, model_datasets, register_model

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "create_model",
    "list_models",
    "model_datasets",
    "register_model",
]
