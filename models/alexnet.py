"""SNIP/ITOP AlexNet for CIFAR (``alexnet-s``, ``alexnet-b``): BN instead of pooling/dropout."""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model
from .units import layer_units

# (in, out, kernel, stride, padding): strides of 2 and no pooling take 32x32 to 1x1
# (32 -> 13 -> 7 -> 4 -> 2 -> 1), so the first FC sees 256 features.
_CONVS = [
    (3, 96, 11, 2, 2),
    (96, 256, 5, 2, 2),
    (256, 384, 3, 2, 1),
    (384, 384, 3, 2, 1),
    (384, 256, 3, 2, 1),
]


class AlexNet(nn.Module):
    """AlexNet as in SNIP/ITOP: conv(bias)+BN+ReLU x5, then FC+BN1d+ReLU x2 of width
    ``1024 * factor``, then the classifier (``classifier.6``).

    Input ``(B, 3, 32, 32)``; output logits ``(B, num_classes)``.
    """

    def __init__(self, factor: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out, k, s, p in _CONVS:
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size=k, stride=s, padding=p, bias=True),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*layers)
        hidden = 1024 * factor
        self.classifier = nn.Sequential(
            nn.Linear(256, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


_CIFAR = ("cifar10", "cifar100")


@register_model("alexnet-s", datasets=_CIFAR, fsdp_units=layer_units)
def alexnet_s(num_classes: int) -> nn.Module:
    """AlexNet-s (small): hidden FCs of 1024."""
    return AlexNet(factor=1, num_classes=num_classes)


@register_model("alexnet-b", datasets=_CIFAR, fsdp_units=layer_units)
def alexnet_b(num_classes: int) -> nn.Module:
    """AlexNet-b (big): hidden FCs of 2048."""
    return AlexNet(factor=2, num_classes=num_classes)
