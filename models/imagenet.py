"""ImageNet models: torchvision ResNet-50 (v1.5) with the reference recipes' conv inits, and
ResNet-18 with the same inits for tests and smoke runs."""

from __future__ import annotations

import torchvision
from torch import nn

from .registry import register_model

INITS = ("fanin", "classic")


def init_convs(model: nn.Module, init: str) -> nn.Module:
    """Re-initialise a torchvision ResNet in place, as ``-c fanin`` / ``-c classic`` do.

    ``fanin``: every Conv2d weight Kaiming-normal(mode='fan_in', ReLU gain), BN gamma 1 and
    beta 0 (no zero-gamma on the last BN of a block), FC left at PyTorch's default.
    ``classic``: torchvision's own init (Kaiming-normal fan_out), i.e. nothing to change.
    """
    if init not in INITS:
        raise ValueError(f"Unknown init {init!r}; expected one of {', '.join(INITS)}")
    if init == "classic":
        return model
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """FSDP units: every residual block (its downsample inside it); the stem and ``fc`` stay
    with the root."""
    blocks = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)
    return [m for m in model.modules() if isinstance(m, blocks)]


@register_model("resnet50", datasets=("imagenet",), fsdp_units=fsdp_units)
def resnet50(num_classes: int, init: str = "fanin") -> nn.Module:
    """torchvision ResNet-50 (stride on the 3x3 conv; torchvision parameter names).

    Input ``(B, 3, H, W)`` (224x224 in the recipe); output logits ``(B, num_classes)``.
    """
    if init not in INITS:  # fail before paying for the 25M-parameter construction
        raise ValueError(f"Unknown init {init!r}; expected one of {', '.join(INITS)}")
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    return init_convs(model, init)


@register_model("resnet18", datasets=("imagenet",), fsdp_units=fsdp_units)
def resnet18(num_classes: int, init: str = "fanin") -> nn.Module:
    """torchvision ResNet-18 (11.7M parameters): a small ImageNet model for tests and smoke runs,
    with the same ``init`` options as ``resnet50``. Input ``(B, 3, H, W)``, any H, W >= 32."""
    if init not in INITS:
        raise ValueError(f"Unknown init {init!r}; expected one of {', '.join(INITS)}")
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    return init_convs(model, init)
