"""FLOPs accounting (docs/algorithms.md §8): exact counts of hand-computable layers, the training-cost rules,
the run counter, and the published ResNet-50 figures."""

import logging

import pytest
import torch
from torch import nn

import models
from itop_dist import maskable_parameters
from itop_dist.flops import (ACTIVATION_PRODUCTS, FlopsCounter, layer_flops, sparse_flops, step_flops,
                             train_step_flops)
from itop_dist.flops import test_rel as flops_test_rel
from itop_dist.topology import erk_densities

IMAGENET_TRAIN = 1_281_167


# --------------------------------------------------------------------------------------------
# Exact per-layer FLOPs, computed by hand


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


@pytest.mark.parametrize("batch", [1, 3])
def test_conv_then_linear_exact(batch):
    flops = layer_flops(tiny_net(), torch.randn(batch, 3, 8, 8))
    # conv: 2 x (3 x 3 x 3 MACs) per output x (4 x 8 x 8 outputs); linear: 2 x 256 x 10.
    assert flops == {"0.weight": 2 * 27 * 256, "4.weight": 2 * 256 * 10}
    assert flops == {"0.weight": 13_824, "4.weight": 5_120}


def test_grouped_strided_conv_conv1d_and_tokens_exact():
    net = nn.ModuleDict({
        "grouped": nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=4),  # 9x9 -> 5x5
        "conv1d": nn.Conv1d(4, 32, 5),                                  # length 40 -> 36
        "tokens": nn.Linear(6, 5),                                      # on (B, T=7, F=6)
    })

    class Three(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, img, seq, tok):
            return self.net["grouped"](img), self.net["conv1d"](seq), self.net["tokens"](tok)

    x = (torch.randn(2, 8, 9, 9), torch.randn(2, 4, 40), torch.randn(2, 7, 6))
    flops = layer_flops(Three(), x)
    assert flops == {
        "net.grouped.weight": 2 * (8 // 4) * 3 * 3 * 16 * 5 * 5,  # 14,400
        "net.conv1d.weight": 2 * 4 * 5 * 32 * 36,                # 46,080
        "net.tokens.weight": 2 * 6 * 5 * 7,                      # 420: every token
    }


def test_shared_layer_counts_every_call_and_batch_size_override():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return self.fc(self.fc(x))

    assert layer_flops(Twice(), torch.randn(4, 6)) == {"fc.weight": 2 * 2 * 36}
    # sequence-first input (T=7, B=2, F=6): the batch is not the leading dim
    assert layer_flops(nn.Linear(6, 5), torch.randn(7, 2, 6), batch_size=2) == {"weight": 420}
    with pytest.raises(ValueError, match="batch_size"):  # a wrong batch size shows
        layer_flops(nn.Linear(6, 5), torch.randn(7, 2, 6), batch_size=11)


def test_tied_embedding_is_not_counted():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(11, 4), nn.Linear(4, 11, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens):
            return self.head(self.embed(tokens))

    assert layer_flops(Tied(), torch.zeros(2, 5, dtype=torch.long)) == {"head.weight": 2 * 4 * 11 * 5}


def test_products_outside_masked_layers_are_activation_products_and_stay_dense():
    """Attention's q k^T and attn v run outside every masked layer: counted apart, and dense."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(4, 12)

        def forward(self, x):  # (B, T=5, 4)
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return (q @ k.transpose(1, 2)).softmax(-1) @ v  # 2 bmm of 2*5*5*4 FLOPs each

    flops = layer_flops(Attention(), torch.randn(2, 5, 4))
    assert flops == {"qkv.weight": 2 * 4 * 12 * 5, ACTIVATION_PRODUCTS: 2 * (2 * 5 * 5 * 4)}
    assert sparse_flops(flops, {"qkv.weight": 0.25}) == 0.25 * 480 + 400


def test_meta_equals_real_and_model_state_untouched():
    real = tiny_net().train()
    real[1].eval()  # a mixed-mode model is restored module by module
    with torch.device("meta"):
        meta = tiny_net()
    flops = layer_flops(real, torch.randn(1, 3, 8, 8) * 10)
    assert flops == layer_flops(meta, torch.empty(1, 3, 8, 8, device="meta"))
    assert real.training and not real[1].training
    assert torch.equal(real[1].running_mean, torch.zeros(4))  # no statistics updated


def test_layer_never_called_counts_zero_with_warning(caplog):
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.aux = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    with caplog.at_level(logging.WARNING, logger="itop_dist"):
        assert layer_flops(Unused(), torch.randn(1, 3)) == {"used.weight": 12, "aux.weight": 0}
    assert "aux.weight" in caplog.text


def test_sparse_flops_uses_per_layer_densities():
    flops = {"a": 1000, "b": 100}
    # same overall weight density can mean very different FLOPs: only per-layer densities count
    assert sparse_flops(flops, {"a": 0.1, "b": 0.5}) == pytest.approx(150.0)
    assert sparse_flops(flops, {"a": 0.5}) == pytest.approx(600.0)  # "b" unmasked: dense
    assert flops_test_rel(flops, {"a": 0.1, "b": 0.5}) == pytest.approx(150 / 1100)
    with pytest.raises(ValueError, match="'c'"):
        sparse_flops(flops, {"c": 0.5})


# --------------------------------------------------------------------------------------------
# Training cost rules and the run counter (f_D = 100, f_S = 30 per sample)


def test_training_cost_per_method():
    fd, fs = 100.0, 30.0
    assert train_step_flops(fd, fs, None, None) == 300.0                  # dense 3 f_D
    assert train_step_flops(fd, fs, "random", 100) == 90.0                # SET 3 f_S
    assert train_step_flops(fd, fs, "static", None) == 90.0
    assert train_step_flops(fd, fs, "momentum", 100) == 160.0             # 2 f_S + f_D
    assert train_step_flops(fd, fs, "momentum", None) == 90.0             # static masks
    assert train_step_flops(fd, fs, "gradient", 4) == (3 * 30 * 4 + 2 * 30 + 100) / 5
    assert step_flops(fd, fs, "gradient", update_step=True) == 160.0
    assert step_flops(fd, fs, "gradient", update_step=False) == 90.0
    with pytest.raises(ValueError, match="magic"):
        step_flops(fd, fs, "magic", False)


def test_counter_counts_dense_gradient_on_update_steps_and_densities_as_they_change():
    counter = FlopsCounter({"a": 60, "b": 40}, {"a": 0.5, "b": 0.0})  # f_D 100, f_S 30
    assert counter.test_rel == pytest.approx(0.3)
    for step in range(1, 9):
        counter.step(None, 10, "gradient", update_step=step % 4 == 0)
    assert counter.total == pytest.approx(10 * (6 * 90 + 2 * 160))
    counter.step({"a": 1.0, "b": 1.0}, 10, "static")  # densities changed (e.g. GMP): f_S 100
    assert counter.total == pytest.approx(10 * (6 * 90 + 2 * 160 + 300))
    assert counter.dense_total == pytest.approx(9 * 10 * 300)
    assert counter.train_rel == pytest.approx(counter.total / counter.dense_total)
    assert (counter.samples, counter.steps) == (90, 9)
    counter.count_forward(5)  # a batch-norm recalibration pass at the current densities
    assert counter.total == pytest.approx(10 * (6 * 90 + 2 * 160 + 300) + 5 * 100)


def test_counter_agrees_with_steady_state_formula():
    fd, fs, dt = 100.0, 30.0, 100
    counter = FlopsCounter({"w": 100}, {"w": 0.3})
    for step in range(1, 50 * dt + 1):
        counter.step(None, 1, "gradient", update_step=step % dt == 0)
    per_step = counter.total / counter.steps
    assert per_step == pytest.approx(3 * fs + (fd - fs) / dt)
    # the formula spreads the dense step over dt + 1 steps: they differ by (f_D-f_S)/(dt(dt+1))
    gap = abs(per_step - train_step_flops(fd, fs, "gradient", dt))
    assert gap <= (fd - fs) / (dt * (dt + 1)) + 1e-9


def test_counter_resumes_where_it_stopped():
    whole = FlopsCounter({"a": 60, "b": 40}, {"a": 0.5, "b": 0.1})
    first = FlopsCounter({"a": 60, "b": 40}, {"a": 0.5, "b": 0.1})
    plan = [(None if s != 5 else {"a": 0.3, "b": 0.2}, 8, "gradient", s % 3 == 0)
            for s in range(10)]
    for args in plan:
        whole.step(*args)
    for args in plan[:6]:
        first.step(*args)
    resumed = FlopsCounter({"a": 60, "b": 40})  # densities come from the checkpoint
    resumed.load_state_dict(first.state_dict())
    for args in plan[6:]:
        resumed.step(*args)
    assert resumed.state_dict() == whole.state_dict()  # the same additions in the same order
    with pytest.raises(ValueError, match="same model"):
        FlopsCounter({"a": 61}).load_state_dict(first.state_dict())


# --------------------------------------------------------------------------------------------
# The published ResNet-50 figures (ImageNet, 224x224), computed from the real model and the
# real ERK densities. Spec 8 [measured] values are checked tightly (0.5%), the README's rounded
# figures within 2%.


@pytest.fixture(scope="module")
def resnet50():
    with torch.device("meta"):  # shapes only; test_resnet50_real_forward checks a real forward
        model = models.create_model("resnet50", "imagenet", num_classes=1000)
    shapes = {n: tuple(p.shape) for n, p in maskable_parameters(model).items()}
    return layer_flops(model, torch.empty(1, 3, 224, 224, device="meta")), shapes


def test_resnet50_real_forward_matches(resnet50):
    model = models.create_model("resnet50", "imagenet", num_classes=1000)
    assert layer_flops(model, torch.randn(1, 3, 224, 224)) == resnet50[0]


@pytest.mark.gpu
def test_resnet50_on_cuda_matches(resnet50):
    model = models.create_model("resnet50", "imagenet", num_classes=1000).cuda()
    assert layer_flops(model, torch.randn(2, 3, 224, 224, device="cuda")) == resnet50[0]


def test_resnet50_dense(resnet50):
    flops, _ = resnet50
    f_dense = sum(flops.values())
    assert len(flops) == 54
    assert flops["conv1.weight"] == 2 * 3 * 7 * 7 * 64 * 112 * 112
    assert flops["fc.weight"] == 2 * 2048 * 1000
    assert f_dense == pytest.approx(8.18e9, rel=5e-3)   # spec [measured]
    assert f_dense == pytest.approx(8.2e9, rel=0.02)    # README
    dense = FlopsCounter(flops)
    for _ in range(100):  # 100 epochs of the ImageNet training set
        dense.step(None, IMAGENET_TRAIN, None)
    assert dense.total == pytest.approx(3.14e18, rel=5e-3)
    assert dense.total == pytest.approx(3.2e18, rel=0.02)
    assert dense.train_rel == 1.0


# README train figures: 0.42x at 0.2 (within 2%) and 0.25x at 0.1. Ours at 0.1 is 0.244, 2.4%
# below 0.25 because RigL's counter also counts bias and activation ops; the spec states
# agreement to 0.01 absolute for this convention, which is what is asserted there.
@pytest.mark.parametrize("density,test_spec,test_readme,rigl_spec,train_readme", [
    (0.2, 0.414, 0.42, None, pytest.approx(0.42, rel=0.02)),
    (0.1, 0.242, 0.24, 0.244, pytest.approx(0.25, abs=0.01)),
])
def test_resnet50_erk(resnet50, density, test_spec, test_readme, rigl_spec, train_readme):
    flops, shapes = resnet50
    densities = erk_densities(shapes, density)
    f_dense, f_sparse = sum(flops.values()), sparse_flops(flops, densities)
    assert flops_test_rel(flops, densities) == pytest.approx(test_spec, rel=5e-3)
    assert f_sparse / f_dense == pytest.approx(test_readme, rel=0.02)
    rigl = train_step_flops(f_dense, f_sparse, "gradient", 100) / (3 * f_dense)
    if rigl_spec is not None:
        assert rigl == pytest.approx(rigl_spec, rel=5e-3)
    assert rigl == train_readme
    # RigL-ITOP's ΔT = 4000 costs almost nothing over static: one dense gradient per 4000 steps
    itop = train_step_flops(f_dense, f_sparse, "gradient", 4000) / (3 * f_dense)
    assert f_sparse / f_dense < itop < f_sparse / f_dense + 1e-3
    # the run counter reproduces the formula (dense gradient on every 100th step)
    counter = FlopsCounter(flops, densities)
    for step in range(1, 1001):
        counter.step(None, 256, "gradient", update_step=step % 100 == 0)
    assert counter.train_rel == pytest.approx(rigl, abs=1e-4)
    assert counter.test_rel == pytest.approx(f_sparse / f_dense)
