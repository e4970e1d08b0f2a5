"""The pure mask maths: densities, exact selection, prune, grow, redistribution, packing."""

import math

import pytest
import torch

import models
from data_pipelines import DATASETS
from itop_dist import maskable_parameters
from itop_dist import topology as T


def shapes_of(name: str, data: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = models.create_model(name, data, num_classes=DATASETS[data].num_classes)
    return {n: tuple(p.shape) for n, p in maskable_parameters(model).items()}


def eps_of(densities, shapes, name):
    """ERK's epsilon, read back from a non-dense layer: density / raw ratio."""
    s = shapes[name]
    return densities[name] / (sum(s) / math.prod(s))


# Reference values measured on the original code (docs/algorithms.md §2.2 table).
ERK_CASES = [
    ("vgg-c", "cifar10", 0.05, 48.50101, {"features.0.weight", "classifier.6.weight"},
     {"features.20.weight": 0.3804, "features.30.weight": 0.1898, "classifier.0.weight": 0.1184}),
    ("ResNet-34", "cifar100", 0.05, 63.53144, {"conv1.weight", "layer2.0.shortcut.0.weight"},
     {"LAST": 0.7594, "layer4.1.conv1.weight": 0.02774}),
    ("ResNet-34", "cifar100", 0.02, 25.25255, {"conv1.weight"},
     {"LAST": 0.3018, "layer4.1.conv1.weight": 0.01103}),
    ("resnet50", "imagenet", 0.2, 99.56117,
     {"layer1.0.conv1.weight", "layer1.1.conv1.weight", "layer1.2.conv1.weight",
      "layer1.0.conv3.weight", "layer1.1.conv3.weight", "layer1.2.conv3.weight",
      "layer1.0.downsample.0.weight", "layer2.0.conv1.weight"},
     {"conv1.weight": 0.8572, "fc.weight": 0.1482, "layer4.0.conv2.weight": 0.04347}),
    ("resnet50", "imagenet", 0.1, 48.78610, {"layer1.0.conv1.weight"},
     {"conv1.weight": 0.4200, "fc.weight": 0.0726}),
    ("lenet300-100", "mnist", 0.05, 8.35006, set(),
     {"fc1.weight": 0.038484, "fc2.weight": 0.111334, "fc3.weight": 0.918507}),
]


# Sets sorted in the ids: every pytest-xdist worker (its own hash seed) collects the same names.
@pytest.mark.parametrize("model,data,d,eps,dense,spot", ERK_CASES,
                         ids=lambda v: str(sorted(v) if isinstance(v, set) else v)[:12])
def test_erk_matches_reference(model, data, d, eps, dense, spot):
    shapes = shapes_of(model, data)
    dens = T.erk_densities(shapes, d)
    assert {n for n, v in dens.items() if v == 1.0} == dense
    sparse_layer = next(n for n in shapes if n not in dense)
    assert eps_of(dens, shapes, sparse_layer) == pytest.approx(eps, rel=1e-6)
    for name, value in spot.items():
        name = list(shapes)[-1] if name == "LAST" else name  # the classifier
        tol = 5e-7 if len(str(value)) > 7 else 5e-5
        assert dens[name] == pytest.approx(value, abs=tol), name
    n = {k: math.prod(s) for k, s in shapes.items()}
    assert sum(dens[k] * n[k] for k in n) == pytest.approx(d * sum(n.values()), rel=1e-12)
    assert max(dens.values()) <= 1.0


@pytest.mark.parametrize("rule", ["uniform", "ERK", "ER"])
@pytest.mark.parametrize("model,data", [("vgg-c", "cifar10"), ("wrn-28-2", "cifar10"),
                                        ("lenet5", "mnist")])
@pytest.mark.parametrize("d", [0.01, 0.2])
def test_exact_init_hits_total_within_one_weight_per_layer(rule, model, data, d):
    shapes = shapes_of(model, data)
    dens = T.layer_densities(rule, shapes, d)
    assert all(0 < v <= 1 for v in dens.values())
    gen = torch.Generator().manual_seed(0)
    nnz = sum(int(T.random_mask(s, dens[n], gen).sum()) for n, s in shapes.items())
    total = sum(math.prod(s) for s in shapes.values())
    assert abs(nnz - d * total) <= len(shapes) / 2 + 1e-6


def test_er_ignores_kernel_dims_and_is_capped():
    shapes = {"a": (64, 3, 7, 7), "b": (512, 512, 3, 3), "c": (10, 512)}
    dens = T.erk_densities(shapes, 0.01, kernel_dims=False)
    assert dens["b"] / dens["c"] == pytest.approx((1024 / 512**2) / (522 / 5120))
    assert dens["a"] / dens["c"] == pytest.approx((67 / 192) / (522 / 5120))
    capped = T.erk_densities(shapes, 0.1, kernel_dims=False)
    assert capped["a"] == capped["c"] == 1.0 and capped["b"] < 1.0
    n = {k: math.prod(s) for k, s in shapes.items()}
    assert sum(capped[k] * n[k] for k in n) == pytest.approx(0.1 * sum(n.values()))


def test_er_itop_reproduces_reference_shortfall():
    shapes = shapes_of("resnet50", "imagenet")
    n = {k: math.prod(s) for k, s in shapes.items()}
    for d, realised in [(0.2, 0.1959), (0.1, 0.0992)]:
        dens = T.er_itop_densities(shapes, d)
        assert sum(dens[k] * n[k] for k in n) / sum(n.values()) == pytest.approx(realised, abs=5e-5)


def test_unknown_init_rule_names_flag():
    with pytest.raises(ValueError, match="--sparse-init"):
        T.layer_densities("snipx", {"a": (2, 2)}, 0.5)


def test_select_k_exact_and_tie_break_by_index():
    scores = torch.tensor([0.5, 0.1, 0.5, 0.5, 0.9, 0.1])
    assert T.select_k(scores, 3).tolist() == [True, False, True, False, True, False]
    assert T.select_k(scores, 1, largest=False).tolist() == [False, True, False, False, False, False]
    for k in range(7):
        assert int(T.select_k(scores, k).sum()) == k
    with pytest.raises(ValueError):
        T.select_k(scores, 7)


def test_random_mask_exact_vs_bernoulli():
    g = torch.Generator().manual_seed(1)
    counts = {int(T.random_mask((100, 50), 0.1, g).sum()) for _ in range(5)}
    assert counts == {500}
    counts = {int(T.random_mask((100, 50), 0.1, g, exact=False).sum()) for _ in range(5)}
    assert len(counts) > 1  # Bernoulli draws vary (the reference's behaviour)


@pytest.fixture
def layer():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 30, generator=g)
    mask = T.random_mask(w.shape, 0.3, g)
    return w * mask, mask


def test_prune_magnitude_removes_exactly_the_smallest(layer):
    w, mask = layer
    new = T.prune_magnitude(w, mask, 50)
    assert int(mask.sum() - new.sum()) == 50
    assert not (new & ~mask).any()
    assert w[mask & ~new].abs().max() <= w[new].abs().min()


def test_prune_magnitude_threshold_drops_ties(layer):
    w, mask = layer
    w = w.clone()
    active = torch.nonzero(mask.reshape(-1)).reshape(-1)
    w.view(-1)[active[:4]] = 0.0  # active exact zeros, e.g. just grown
    new = T.prune_magnitude_threshold(w, mask, 2)
    assert int(mask.sum() - new.sum()) >= 4  # every active zero goes (docs/algorithms.md §3.1a)
    assert not (w[new] == 0).any()


def test_prune_set_takes_smallest_positive_and_negatives_nearest_zero(layer):
    w, mask = layer
    new = T.prune_set(w, mask, 21)
    removed = mask & ~new
    assert int(removed.sum()) == 21
    pos_removed, neg_removed = removed & (w >= 0), removed & (w < 0)
    assert int(pos_removed.sum()) == 11 and int(neg_removed.sum()) == 10
    assert w[pos_removed].max() <= w[new & (w >= 0)].min()
    assert w[neg_removed].min() >= w[new & (w < 0)].max()


def test_prune_threshold_keeps_large_weights(layer):
    w, mask = layer
    new = T.prune_threshold(w, mask, 0, threshold=0.5)
    assert torch.equal(new, mask & (w.abs() > 0.5))


@pytest.mark.parametrize("growth", sorted(T.GROW_FNS))
def test_growth_picks_exactly_n_inactive(growth, layer):
    w, mask = layer
    score = torch.randn(w.shape, generator=torch.Generator().manual_seed(9))
    grown = T.GROW_FNS[growth](mask, 77, grad=score, momentum=score,
                               generator=torch.Generator().manual_seed(5))
    assert int(grown.sum()) == 77
    assert not (grown & mask).any()


def test_gradient_growth_picks_largest_inactive_scores(layer):
    w, mask = layer
    score = torch.randn(w.shape, generator=torch.Generator().manual_seed(9))
    grown = T.grow_gradient(mask, 30, grad=score)
    assert score.abs()[grown].min() >= score.abs()[~mask & ~grown].max()


def test_random_growth_is_reproducible_and_uniform(layer):
    _, mask = layer
    a = T.grow_random(mask, 100, generator=torch.Generator().manual_seed(1))
    b = T.grow_random(mask, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    hits = sum(T.grow_random(mask, 100, generator=torch.Generator().manual_seed(s)).float()
               for s in range(200))
    inactive = hits[~mask]
    expected = 200 * 100 / inactive.numel()
    assert abs(inactive.mean().item() - expected) < 1e-4  # exact count each draw
    assert inactive.std().item() < 2.5 * math.sqrt(expected)  # no position favoured


def test_allocate_sums_exactly_and_respects_caps():
    shares = {"a": 0.7, "b": 0.2, "c": 0.1}
    out = T.allocate(101, shares, {"a": 30, "b": 100, "c": 100})
    assert sum(out.values()) == 101 and out["a"] == 30
    assert T.allocate(500, shares, {"a": 1, "b": 2, "c": 3}) == {"a": 1, "b": 2, "c": 3}


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 7), (64, 3, 3, 3)])
def test_pack_bits_round_trip_and_size(shape):
    m = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.3
    packed = T.pack_bits(m)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(m.numel() / 8)
    assert torch.equal(T.unpack_bits(packed, shape), m)


@pytest.mark.parametrize("shape, width", [((3, 5, 7), 5), ((64, 3, 3, 3), 4), ((10, 64), 8), ((0, 9), 2)])
def test_pack_rows_packs_each_row_alone(shape, width):
    """Row r of the packing is the packing of row r: a block of rows unpacks on its own."""
    m = torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.3
    packed = T.pack_rows(m)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (shape[0], width)
    assert torch.equal(T.unpack_rows(packed, shape), m)
    for r in range(shape[0]):
        assert torch.equal(packed[r], T.pack_bits(m[r]))
    if shape[0] > 2:
        assert torch.equal(T.unpack_rows(packed[1:3], (2, *shape[1:])), m[1:3])
