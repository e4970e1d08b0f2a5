"""CIFAR ResNets: kuangliu-style ResNet-18/34/50 (ITOP, GraNet, SUP) and Frankle-style
``cifar_resnet_N`` (GraNet/SUP, from OpenLTH)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Identity, or 1x1 conv + BN (``shortcut.0`` / ``shortcut.1``) when the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Post-activation block: conv3x3(stride)-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """Bottleneck 1x1-3x3(stride)-1x1 (x4 expansion), stride on the 3x3 as in kuangliu."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """kuangliu CIFAR ResNet as used by ITOP/GraNet/SUP: 3x3 stem (no maxpool), four stages
    of 64/128/256/512 planes with first strides 1/2/2/2, avgpool 4, bias-free ``classifier``.

    The head is named ``classifier`` (not kuangliu's ``linear``) as in the reference
    ``models.py`` / ``resnet_cifar100.py``; GraNet's uniform pruning finds the head by that name.
    Input ``(B, 3, 32, 32)``; output logits ``(B, num_classes)``.
    """

    def __init__(
        self, block: type[BasicBlock] | type[Bottleneck], num_blocks: Sequence[int], num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.classifier = nn.Linear(512 * block.expansion, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4)
        return self.classifier(out.flatten(1))


class FrankleResNet(nn.Module):
    """OpenLTH ``cifar_resnet_N`` (GraNet/SUP): 3x3 stem ``conv``/``bn`` with 16 filters, three
    segments of D = (N - 2) / 6 basic blocks with 16/32/64 filters (downsampling by a strided
    1x1-conv shortcut at each segment start), global avgpool, ``fc`` with bias.

    Init: Kaiming-normal (fan_in, gain sqrt 2) on every conv and linear weight, as OpenLTH's
    ``initializers.kaiming_normal``. Input ``(B, 3, 32, 32)``; output logits ``(B, num_classes)``.
    """

    def __init__(self, depth: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"cifar_resnet depth must be 6D + 2 with D >= 1, got {depth}")
        d = (depth - 2) // 6
        self.conv = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks = []
        in_planes = width
        for segment, planes in enumerate((width, 2 * width, 4 * width)):
            for j in range(d):
                stride = 2 if (segment > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu(self.bn(self.conv(x))))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(out.flatten(1))


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """FSDP units: every residual block (its shortcut inside it); the stem and the classifier
    stay with the root."""
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


_CIFAR = ("cifar10", "cifar100")


@register_model("ResNet-18", datasets=_CIFAR, fsdp_units=fsdp_units)
def resnet18_cifar(num_classes: int) -> nn.Module:
    """CIFAR ResNet-18, BasicBlocks [2, 2, 2, 2]."""
    return CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes)


@register_model("ResNet-34", datasets=_CIFAR, fsdp_units=fsdp_units)
def resnet34_cifar(num_classes: int) -> nn.Module:
    """CIFAR ResNet-34, BasicBlocks [3, 4, 6, 3]. (ITOP's main builds it with 100 classes for
    every dataset; pass ``num_classes=100`` to reproduce that.)"""
    return CifarResNet(BasicBlock, [3, 4, 6, 3], num_classes)


@register_model("ResNet50", datasets=_CIFAR, fsdp_units=fsdp_units)
def resnet50_cifar(num_classes: int) -> nn.Module:
    """GraNet/SUP CIFAR ResNet-50, Bottlenecks [3, 4, 6, 3]."""
    return CifarResNet(Bottleneck, [3, 4, 6, 3], num_classes)


@register_model("cifar_resnet_20", datasets=_CIFAR, fsdp_units=fsdp_units)
def cifar_resnet_20(num_classes: int) -> nn.Module:
    """OpenLTH ResNet-20 (3 blocks per segment)."""
    return FrankleResNet(20, num_classes)


@register_model("cifar_resnet_32", datasets=_CIFAR, fsdp_units=fsdp_units)
def cifar_resnet_32(num_classes: int) -> nn.Module:
    """OpenLTH ResNet-32 (5 blocks per segment)."""
    return FrankleResNet(32, num_classes)
