"""VGG variants for CIFAR: SNIP/ITOP ``vgg-c``, ``vgg-d``, ``vgg-like`` and GraNet/SUP ``vgg19``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import nn

from .registry import register_model
from .units import layer_units

# A config entry: output channels of a 3x3 conv, (kernel size, output channels), or "M" (maxpool 2).
LayerCfg = Union[int, tuple[int, int], str]

_VGG_C: list[LayerCfg] = [
    64, 64, "M", 128, 128, "M", 256, 256, (1, 256), "M",
    512, 512, (1, 512), "M", 512, 512, (1, 512), "M",
]  # fmt: skip
_VGG_D: list[LayerCfg] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]  # fmt: skip
# GraNet/SUP (GraSP-style) VGG-19: no final maxpool, an AvgPool2d(2) follows instead.
_VGG_19: list[LayerCfg] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512,
]  # fmt: skip


def make_vgg_features(cfg: Sequence[LayerCfg], conv_bias: bool) -> nn.Sequential:
    """Conv-BN-ReLU stack from ``cfg``; parameters are named ``N.weight`` by position.

    Every conv uses padding 1, *including* the 1x1 convs of ``vgg-c``: that is what SNIP/ITOP's
    ``make_layers`` does, so each 1x1 conv grows the feature map by 2 (32 -> ... -> 2x2 before
    flattening, hence vgg-c's 2048-wide first FC). Reproducing it keeps parameter counts and
    ERK densities identical to the reference.
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        kernel, out_channels = v if isinstance(v, tuple) else (3, v)
        assert isinstance(out_channels, int)
        layers += [
            nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=1, bias=conv_bias),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers)


class SnipVGG(nn.Module):
    """SNIP/ITOP VGG (``VGG16`` in ITOP's models.py): conv stack, then FCs of width 512 with
    ReLU -> BatchNorm1d in place of dropout, then the classifier.

    Input ``(B, 3, 32, 32)``; output logits ``(B, num_classes)``.
    """

    def __init__(
        self, cfg: Sequence[LayerCfg], flat_features: int, hidden_fcs: int, num_classes: int
    ) -> None:
        super().__init__()
        self.features = make_vgg_features(cfg, conv_bias=True)
        layers: list[nn.Module] = []
        width = flat_features
        for _ in range(hidden_fcs):
            layers += [nn.Linear(width, 512), nn.ReLU(True), nn.BatchNorm1d(512)]
            width = 512
        layers.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class GraNetVGG(nn.Module):
    """GraNet/SUP VGG (``vgg.VGG(depth=19, batchnorm=True)``): bias-free convs with BN,
    AvgPool2d(2) on the final 2x2 map, one Linear classifier.

    The first conv is ``feature.0`` (singular), the name GraNet's code uses for the first layer (its
    rm-first option keeps that layer dense; here: ``--exclude feature.0.weight``).
    Init: convs Kaiming-normal fan_out, Linear N(0, 0.01) with zero bias, BN 1/0.
    Input ``(B, 3, 32, 32)``; output logits ``(B, num_classes)``.
    """

    def __init__(self, cfg: Sequence[LayerCfg], num_classes: int) -> None:
        super().__init__()
        self.feature = make_vgg_features(cfg, conv_bias=False)
        last = [v for v in cfg if v != "M"][-1]
        assert isinstance(last, int)
        self.classifier = nn.Linear(last, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.avg_pool2d(self.feature(x), 2)
        return self.classifier(x.flatten(1))


_CIFAR = ("cifar10", "cifar100")


@register_model("vgg-c", datasets=_CIFAR, fsdp_units=layer_units)
def vgg_c(num_classes: int) -> nn.Module:
    """SNIP VGG-C: VGG-16 with 1x1 convs in the last three stages; flatten 512x2x2."""
    return SnipVGG(_VGG_C, flat_features=2048, hidden_fcs=2, num_classes=num_classes)


@register_model("vgg-d", datasets=_CIFAR, fsdp_units=layer_units)
def vgg_d(num_classes: int) -> nn.Module:
    """SNIP VGG-D: VGG-16 (13 3x3 convs), two hidden FCs of 512."""
    return SnipVGG(_VGG_D, flat_features=512, hidden_fcs=2, num_classes=num_classes)


@register_model("vgg-like", datasets=_CIFAR, fsdp_units=layer_units)
def vgg_like(num_classes: int) -> nn.Module:
    """SNIP VGG-like: VGG-D convs, one hidden FC of 512."""
    return SnipVGG(_VGG_D, flat_features=512, hidden_fcs=1, num_classes=num_classes)


@register_model("vgg19", datasets=_CIFAR, fsdp_units=layer_units)
def vgg19(num_classes: int) -> nn.Module:
    """GraNet/Sup-tickets VGG-19 with BN (20,035,018 params at 10 classes)."""
    return GraNetVGG(_VGG_19, num_classes)
