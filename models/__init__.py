"""Model zoo of itop_dist: plain single-device ``nn.Module``s returning logits.

Models know nothing about masks, sparsity or distribution; ``itop_dist`` decides which layers
are masked, ``data_pipelines`` what the data is (models import neither). Build one with
``create_model(name, dataset, num_classes=...)``: the dataset name picks the variant; see
``list_models()``. Each family names its blocks for sharded training (``model_fsdp_units``);
``launcher/parallel.py`` shards them. ``timm/NAME`` builds any timm model (``timm_models``).
"""

from __future__ import annotations

# Importing the architecture modules registers their models.
from . import alexnet, imagenet, mlp, resnet, vgg, wrn  # noqa: F401
from .timm_models import ModelError, parse_model_kwargs
from .registry import FsdpUnits, create_model, list_models, model_datasets, model_fsdp_units, register_model

__all__ = [
    "FsdpUnits",
    "ModelError",
    "create_model",
    "list_models",
    "model_datasets",
    "model_fsdp_units",
    "parse_model_kwargs",
    "register_model",
]
