"""FSDP units of the plain feed-forward families (VGG, AlexNet, MLP, LeNet-5): one per layer.

Residual families name their blocks next to them (``resnet.fsdp_units``, ``wrn.fsdp_units``,
``imagenet.fsdp_units``); ``launcher/parallel.py`` applies the units.
"""

from __future__ import annotations

from torch import nn

_LAYERS = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def layer_units(model: nn.Module) -> list[list[nn.Module]]:
    """Each conv or linear layer with the batch norms after it, up to the next layer, in
    definition order (which is the forward order in these families); the last layer, the
    classifier, stays with the root.

    A layer and its norm run back to back, so gathering them together halves the collectives
    of sharding each on its own; parameter-free modules (ReLU, pooling) need no unit.
    """
    units: list[list[nn.Module]] = []
    for module in model.modules():
        if isinstance(module, _LAYERS):
            units.append([module])
        elif isinstance(module, _NORMS) and units:
            units[-1].append(module)
    return units[:-1]
