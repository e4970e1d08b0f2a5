"""Wide ResNets (Zagoruyko & Komodakis) as in the SL/ITOP/SUP ``models.py``: ``wrn-d-k``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class WideBasicBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3(stride)-BN-ReLU-dropout-conv3x3.

    When in != out channels the 1x1 ``convShortcut`` is applied to the *pre-activated* input
    (and conv1 reads the same tensor); otherwise the raw input is the residual.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        # Name kept from the reference so masks / ERK tables line up with it.
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        residual = x if self.convShortcut is None else self.convShortcut(act)
        return residual + out


class _BlockGroup(nn.Module):
    """A stage of ``n`` blocks, held as ``layer`` (so names read ``block1.layer.0.conv1``)."""

    def __init__(
        self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                               stride if i == 0 else 1, drop_rate)
                for i in range(n)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen: conv3x3 3->16, three groups of (depth-4)/6 blocks of widths 16k, 32k,
    64k (strides 1, 2, 2), BN-ReLU, avgpool 8, ``fc``.

    Init as the reference: conv weights N(0, sqrt(2 / (k*k*C_out))), BN 1/0, FC bias 0 (FC
    weight keeps PyTorch's default). Input ``(B, 3, 32, 32)``; output logits ``(B, num_classes)``.
    """

    def __init__(self, depth: int, widen: int, num_classes: int, drop_rate: float = 0.3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = _BlockGroup(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = _BlockGroup(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = _BlockGroup(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(F.relu(self.bn1(out)), 8)
        return self.fc(out.flatten(1))


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """FSDP units: every residual block; the stem conv, the final batch norm and ``fc`` stay
    with the root."""
    return [m for m in model.modules() if isinstance(m, WideBasicBlock)]


_CIFAR = ("cifar10", "cifar100")


def _register_wrn(depth: int, widen: int, drop_rate: float) -> None:
    """Register ``wrn-{depth}-{widen}``; ``drop_rate`` is the reference default for it."""

    @register_model(f"wrn-{depth}-{widen}", datasets=_CIFAR, fsdp_units=fsdp_units)
    def build(num_classes: int, drop_rate: float = drop_rate) -> nn.Module:
        return WideResNet(depth, widen, num_classes, drop_rate)

    build.__name__ = build.__qualname__ = f"wrn_{depth}_{widen}"
    build.__doc__ = f"WRN-{depth}-{widen}, dropout {drop_rate} by default."


# ITOP/SL model dicts use dropout 0.3; Sup-tickets' WRN-28-10 uses 0.0.
for _depth, _widen in ((28, 2), (22, 8), (16, 8), (16, 10)):
    _register_wrn(_depth, _widen, drop_rate=0.3)
_register_wrn(28, 10, drop_rate=0.0)
