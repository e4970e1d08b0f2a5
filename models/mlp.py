"""Small MNIST / CIFAR / digits models: fully connected nets and Caffe LeNet-5 (ITOP/SL zoo)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .units import layer_units


class MLP(nn.Module):
    """Flatten, then ``Linear`` layers with biases and ReLU between them.

    Layers are named ``fc1 .. fcN`` as in ITOP's ``LeNet_300_100`` / ``MLP_CIFAR10``.
    Input ``(B, *shape)`` with ``prod(shape) == widths[0]``; output logits ``(B, widths[-1])``.
    """

    def __init__(self, widths: Sequence[int], batch_norm: bool = False) -> None:
        super().__init__()
        self.num_layers = len(widths) - 1
        self.batch_norm = batch_norm
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
            self.add_module(f"fc{i}", nn.Linear(fan_in, fan_out))
            if batch_norm and i < self.num_layers:
                self.add_module(f"bn{i}", nn.BatchNorm1d(fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.num_layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.num_layers:
                x = F.relu(getattr(self, f"bn{i}")(x) if self.batch_norm else x)
        return x


class LeNet5Caffe(nn.Module):
    """Caffe LeNet-5: the first conv has NO padding, so 28 -> 24 -> 12 -> 8 -> 4 (flatten 800).

    Input ``(B, 1, 28, 28)``; output logits ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc3 = nn.Linear(50 * 4 * 4, 500)
        self.fc4 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc3(x.flatten(1)))
        return self.fc4(x)


@register_model("lenet5", datasets=("mnist",), fsdp_units=layer_units)
def lenet5(num_classes: int) -> nn.Module:
    """Caffe LeNet-5 for MNIST (431,080 params at 10 classes)."""
    return LeNet5Caffe(num_classes)


@register_model("lenet300-100", datasets=("mnist",), fsdp_units=layer_units)
def lenet300_100(num_classes: int) -> nn.Module:
    """FC 784-300-100-c for MNIST (266,610 params at 10 classes)."""
    return MLP([28 * 28, 300, 100, num_classes])


@register_model("MLPCIFAR10", datasets=("cifar10",), fsdp_units=layer_units)
def mlp_cifar10(num_classes: int) -> nn.Module:
    """ITOP's FC 3072-1024-512-c for CIFAR-10 (3,676,682 params at 10 classes)."""
    return MLP([3 * 32 * 32, 1024, 512, num_classes])


@register_model("digits-mlp", datasets=("digits",), fsdp_units=layer_units)
def digits_mlp(num_classes: int) -> nn.Module:
    """FC 64-256-256-c for scikit-learn's 8x8 digits: small enough to train on 2 CPU cores."""
    return MLP([8 * 8, 256, 256, num_classes])


@register_model("digits-mlp-bn", datasets=("digits",), fsdp_units=layer_units)
def digits_mlp_bn(num_classes: int) -> nn.Module:
    """digits-mlp with BatchNorm1d after each hidden layer (for BN-recalibration tests)."""
    return MLP([8 * 8, 256, 256, num_classes], batch_norm=True)
