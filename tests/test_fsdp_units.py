"""Each model family names its FSDP units (models.model_fsdp_units); launcher/parallel.py shards
them (a real FSDP2 wrap at world size 1 here; two-process runs in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

import models
from launcher.parallel import apply_fsdp
from models.resnet import Bottleneck


def units_of(name: str, dataset: str, num_classes: int) -> tuple[nn.Module, list]:
    with torch.device("meta"):
        model = models.create_model(name, dataset, num_classes=num_classes)
    return model, models.model_fsdp_units(name, dataset)(model)


def root_params(model: nn.Module, units: list) -> set[str]:
    """Names of the parameters no unit holds: what the root shards."""
    held = {id(p) for u in units for m in (u if isinstance(u, list) else [u]) for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) not in held}


def test_vgg_c_units_are_conv_bn_and_fc_bn_pairs():
    model, units = units_of("vgg-c", "cifar10", 10)
    # 13 convs, each with its BN, then the 2 hidden FCs with their BN1d (the container guess
    # made 31 units: every conv, BN and FC on its own).
    assert len(units) == 15
    assert [(type(a), type(b)) for a, b in units] == \
        [(nn.Conv2d, nn.BatchNorm2d)] * 13 + [(nn.Linear, nn.BatchNorm1d)] * 2
    assert root_params(model, units) == {"classifier.6.weight", "classifier.6.bias"}


@pytest.mark.parametrize("name,dataset,classes,block,count,root", [
    ("ResNet50", "cifar10", 10, Bottleneck, 16, {"conv1.weight", "bn1.weight", "bn1.bias", "classifier.weight"}),
    ("resnet50", "imagenet", 1000, torchvision.models.resnet.Bottleneck, 16,
     {"conv1.weight", "bn1.weight", "bn1.bias", "fc.weight", "fc.bias"}),
])
def test_resnet50_units_are_its_bottlenecks(name, dataset, classes, block, count, root):
    model, units = units_of(name, dataset, classes)
    assert len(units) == count and all(type(u) is block for u in units)  # [3, 4, 6, 3]
    assert root_params(model, units) == root


@pytest.mark.parametrize("name,dataset,count", [
    ("vgg-d", "cifar10", 15), ("vgg-like", "cifar10", 14), ("vgg19", "cifar10", 16),
    ("alexnet-s", "cifar10", 7), ("ResNet-18", "cifar10", 8), ("cifar_resnet_20", "cifar10", 9),
    ("resnet18", "imagenet", 8), ("wrn-28-10", "cifar10", 12), ("wrn-16-8", "cifar10", 6),
    ("lenet5", "mnist", 3), ("lenet300-100", "mnist", 2), ("digits-mlp-bn", "digits", 2),
])
def test_unit_count_per_family(name, dataset, count):
    _, units = units_of(name, dataset, 10)
    assert len(units) == count


def test_mlp_units_are_its_hidden_layers_with_their_norms():
    model, units = units_of("digits-mlp-bn", "digits", 10)
    assert units == [[model.fc1, model.bn1], [model.fc2, model.bn2]]
    assert root_params(model, units) == {"fc3.weight", "fc3.bias"}


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_apply_fsdp_shards_the_named_units_and_keeps_the_forward(single_rank_group):
    torch.manual_seed(0)
    model = models.create_model("digits-mlp-bn", "digits", num_classes=10).eval()
    x = torch.randn(4, 1, 8, 8)
    expected = model(x)
    with pytest.raises(ValueError, match="Linear is not a submodule"):
        apply_fsdp(model, "no", [[model.fc1, nn.Linear(2, 2)]])
    sharded = apply_fsdp(model, "no", models.model_fsdp_units("digits-mlp-bn", "digits")(model))
    assert all(isinstance(m, FSDPModule) for m in (model, model.fc1, model.bn1, model.fc2, model.bn2))
    assert not isinstance(model.fc3, FSDPModule)  # the classifier is the root's
    # one unit per pair: fc1 and bn1 share one FSDP state (one all-gather), fc2 has its own
    state = fully_shard.state
    assert state(model.fc1) is state(model.bn1) and state(model.fc1) is not state(model.fc2)
    torch.testing.assert_close(sharded(x), expected, rtol=0, atol=0)
