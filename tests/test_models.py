"""Tests for the model zoo: exact parameter counts from algorithms.md §11, shapes, registry rules."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from data_pipelines import DATASETS
from models import create_model, list_models, model_datasets, register_model

# (total, masked) parameter counts from algorithms.md §11 [measured on the reference code],
# keyed by the number of classes. "masked" = every Conv*/Linear weight.
SPEC_COUNTS: dict[str, dict[int, tuple[int, int]]] = {
    "lenet300-100": {10: (266_610, 266_200)},
    "lenet5": {10: (431_080, 430_500)},
    "MLPCIFAR10": {10: (3_676_682, 3_675_136)},
    "alexnet-s": {10: (5_077_066, 5_066_784)},
    "alexnet-b": {10: (8_501_322, 8_484_896)},
    "vgg-c": {10: (11_323_466, 11_307_712)},
    "vgg-d": {10: (15_255_626, 15_239_872)},
    "vgg-like": {10: (14_991_946, 14_977_728)},
    "wrn-28-2": {10: (1_467_610, 1_463_984)},
    "wrn-22-8": {10: (17_158_106, 17_147_312)},
    "wrn-16-8": {10: (10_961_370, 10_954_160)},
    "wrn-16-10": {10: (17_116_634, 17_107_632)},
    "wrn-28-10": {10: (36_479_194, 36_461_232)},
    "ResNet-18": {100: (11_220_032, 11_210_432), 10: (11_173_952, 11_164_352)},
    "ResNet-34": {100: (21_328_192, 21_311_168), 10: (21_282_112, 21_265_088)},
    "ResNet50": {10: (23_520_832, 23_467_712), 100: (23_705_152, 23_652_032)},
    "vgg19": {10: (20_035_018, 20_024_000), 100: (20_081_188, 20_070_080)},
    "cifar_resnet_20": {10: (272_474, 270_896)},
    "cifar_resnet_32": {10: (466_906, 464_432)},
    "resnet50": {1000: (25_557_032, 25_502_912)},
    # Not in the spec: torchvision ResNet-18, the small ImageNet model of the tests.
    "resnet18": {1000: (11_689_512, 11_678_912)},
    # Not in the spec: FC 64-256-256-10 with biases, counted by hand.
    "digits-mlp": {10: (64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10, 64 * 256 + 256 * 256 + 2560)},
    "digits-mlp-bn": {10: (64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10 + 4 * 256,
                           64 * 256 + 256 * 256 + 2560)},
}

# Classifier input width and bias, to derive counts the spec gives only for 10 classes:
# each extra class adds one row of the classifier (and one bias).
HEADS: dict[str, tuple[int, bool]] = {
    "alexnet-s": (1024, True),
    "alexnet-b": (2048, True),
    "vgg-c": (512, True),
    "vgg-d": (512, True),
    "vgg-like": (512, True),
    "wrn-28-2": (128, True),
    "wrn-22-8": (512, True),
    "wrn-16-8": (512, True),
    "wrn-16-10": (640, True),
    "wrn-28-10": (640, True),
    "cifar_resnet_20": (64, True),
    "cifar_resnet_32": (64, True),
}

# Datasets each model is expected to fit (the registry must agree exactly).
CIFAR = ("cifar10", "cifar100")
EXPECTED_FITS: dict[str, tuple[str, ...]] = {
    "lenet300-100": ("mnist",),
    "lenet5": ("mnist",),
    "MLPCIFAR10": ("cifar10",),
    **{n: CIFAR for n in HEADS},
    "ResNet-18": CIFAR,
    "ResNet-34": CIFAR,
    "ResNet50": CIFAR,
    "vgg19": CIFAR,
    "resnet50": ("imagenet",),
    "resnet18": ("imagenet",),
    "digits-mlp": ("digits",),
    "digits-mlp-bn": ("digits",),
}


def expected_counts(name: str, num_classes: int) -> tuple[int, int]:
    """Spec counts for ``num_classes``; derived from the 10-class row via the head if needed."""
    rows = SPEC_COUNTS[name]
    if num_classes in rows:
        return rows[num_classes]
    width, bias = HEADS[name]
    total, masked = rows[10]
    extra = num_classes - 10
    return total + extra * (width + bias), masked + extra * width


def counts(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    masked = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    )
    return total, masked


def all_pairs() -> list:
    """Every (model, dataset) pair; ImageNet ResNet-50 at 224x224 is marked slow (~7 s on CPU)."""
    return [
        pytest.param(n, d, marks=pytest.mark.slow) if d == "imagenet" else (n, d)
        for n in EXPECTED_FITS
        for d in EXPECTED_FITS[n]
    ]


def test_registry_lists_exactly_the_expected_models() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(names) == set(EXPECTED_FITS)
    for name, fits in EXPECTED_FITS.items():
        if name.lower() not in ("resnet50", "resnet18", "resnet-18"):
            assert model_datasets(name) == fits, name
    # ResNet50 / resnet50 (and ResNet-18 / resnet18) are one normalised name: its variants
    # together fit all three.
    assert model_datasets("ResNet50") == ("cifar10", "cifar100", "imagenet")
    assert model_datasets("ResNet-18") == model_datasets("resnet18") == ("cifar10", "cifar100", "imagenet")


@pytest.mark.parametrize(("name", "dataset"), all_pairs())
def test_counts_shapes_and_gradients(name: str, dataset: str) -> None:
    torch.manual_seed(0)
    info = DATASETS[dataset]
    model = create_model(name, dataset, num_classes=DATASETS[dataset].num_classes)
    assert counts(model) == expected_counts(name, info.num_classes)

    model.train()
    x = torch.randn(2, *info.input_shape)
    out = model(x)
    assert out.shape == (2, info.num_classes)
    out.float().pow(2).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname


def test_itop_resnet34_hundred_way_head_on_cifar10() -> None:
    # P13: ITOP builds ResNet-34 with 100 outputs even for CIFAR-10.
    model = create_model("ResNet-34", "cifar10", num_classes=100)
    assert counts(model) == (21_328_192, 21_311_168)


@pytest.mark.parametrize("spelling", ["ResNet-34", "resnet34", "ResNet34", "resnet_34", "RESNET.34"])
def test_lookup_ignores_case_and_separators(spelling: str) -> None:
    model = create_model(spelling, "cifar10", num_classes=10)
    assert counts(model) == SPEC_COUNTS["ResNet-34"][10]
    assert model_datasets(spelling) == CIFAR


def test_dataset_spelling_is_normalised_too() -> None:
    assert counts(create_model("lenet5", "MNIST", num_classes=10)) == SPEC_COUNTS["lenet5"][10]
    assert counts(create_model("vgg-d", "CIFAR-100", num_classes=100))[0] == expected_counts("vgg-d", 100)[0]


def test_dataset_picks_resnet50_variant() -> None:
    imnet = create_model("resnet50", "imagenet", num_classes=1000)
    assert isinstance(imnet, torchvision.models.ResNet)
    assert counts(imnet) == (25_557_032, 25_502_912)
    names = dict(imnet.named_parameters())
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight", "fc.weight", "fc.bias"):
        assert key in names
    # v1.5: the stride sits on the 3x3 conv of the first bottleneck of a stage.
    assert imnet.layer2[0].conv2.stride == (2, 2) and imnet.layer2[0].conv1.stride == (1, 1)
    masked_tensors = [m for m in imnet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(masked_tensors) == 54

    for spelling in ("ResNet50", "resnet-50"):
        cifar = create_model(spelling, "cifar10", num_classes=10)
        assert not isinstance(cifar, torchvision.models.ResNet)
        assert counts(cifar) == (23_520_832, 23_467_712)
        cnames = dict(cifar.named_parameters())
        assert "classifier.weight" in cnames and "classifier.bias" not in cnames
        assert "layer2.0.shortcut.0.weight" in cnames
    assert isinstance(create_model("ResNet50", "imagenet", num_classes=1000), torchvision.models.ResNet)


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("vgg-c", ["features.0.weight", "features.0.bias", "classifier.0.weight", "classifier.6.weight"]),
        ("vgg-like", ["features.0.weight", "classifier.3.weight"]),
        ("alexnet-s", ["features.0.weight", "classifier.6.weight"]),
        ("ResNet-34", ["conv1.weight", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight", "classifier.weight"]),
        ("ResNet-18", ["layer4.1.bn2.weight", "layer3.0.shortcut.1.weight"]),
        ("wrn-28-2", ["conv1.weight", "block1.layer.0.convShortcut.weight", "block3.layer.3.conv2.weight", "bn1.weight", "fc.weight"]),
        ("vgg19", ["feature.0.weight", "classifier.weight", "classifier.bias"]),
        ("cifar_resnet_20", ["conv.weight", "bn.weight", "blocks.3.shortcut.0.weight", "fc.weight", "fc.bias"]),
    ],
)
def test_reference_parameter_names(name: str, keys: list[str]) -> None:
    names = dict(create_model(name, "cifar10", num_classes=10).named_parameters())
    missing = [k for k in keys if k not in names]
    assert not missing


def test_mnist_and_digits_parameter_names() -> None:
    assert [n for n, _ in create_model("lenet5", "mnist", num_classes=10).named_parameters()] == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
        "fc3.weight", "fc3.bias", "fc4.weight", "fc4.bias",
    ]  # fmt: skip
    assert [n for n, _ in create_model("lenet300-100", "mnist", num_classes=10).named_parameters()] == [
        f"fc{i}.{k}" for i in (1, 2, 3) for k in ("weight", "bias")
    ]
    digits = create_model("digits-mlp", "digits", num_classes=10)
    assert [tuple(p.shape) for p in digits.parameters()] == [(256, 64), (256,), (256, 256), (256,), (10, 256), (10,)]


def test_unknown_model_error_lists_known_names() -> None:
    with pytest.raises(ValueError) as exc:
        create_model("resnet9000", "cifar10", num_classes=10)
    msg = str(exc.value)
    assert "\n" not in msg
    assert "resnet9000" in msg
    assert ", ".join(list_models()) in msg
    with pytest.raises(ValueError):
        model_datasets("no-such-model")


def test_wrong_dataset_error_names_model_dataset_and_fits() -> None:
    with pytest.raises(ValueError) as exc:
        create_model("lenet5", "cifar10", num_classes=10)
    msg = str(exc.value)
    assert "lenet5" in msg and "cifar10" in msg and "mnist" in msg
    with pytest.raises(ValueError, match="cifar10, cifar100, imagenet"):
        create_model("resnet50", "mnist", num_classes=10)


def test_unknown_dataset_error_names_it_and_the_fits() -> None:
    with pytest.raises(ValueError) as exc:
        create_model("lenet5", "svhn", num_classes=10)
    msg = str(exc.value)
    assert "'svhn'" in msg and msg.endswith("it fits: mnist")


def test_variant_keys_are_the_data_pipelines_datasets_and_classes_are_required() -> None:
    # models keys its variants by dataset name without importing data_pipelines: a misspelt
    # key would make a variant unreachable from --data.
    keys = {d for name in list_models() for d in model_datasets(name)}
    assert keys == set(DATASETS)
    with pytest.raises(TypeError, match="num_classes"):
        create_model("lenet5", "mnist")  # type: ignore[call-arg]


def test_register_rejects_clashing_variant() -> None:
    # Fails before anything is stored, so the global registry is left untouched.
    with pytest.raises(ValueError, match="clashes"):
        register_model("Lenet-5", datasets=("mnist",), fsdp_units=lambda model: [])(lambda num_classes: nn.Identity())
    assert "Lenet-5" not in list_models()


def test_num_classes_override() -> None:
    model = create_model("vgg-d", "cifar10", num_classes=7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_models_return_logits_not_log_probs() -> None:
    torch.manual_seed(0)
    for name, dataset in [("lenet5", "mnist"), ("vgg-c", "cifar10"), ("ResNet-18", "cifar10")]:
        model = create_model(name, dataset, num_classes=DATASETS[dataset].num_classes).eval()
        out = model(torch.randn(4, *DATASETS[dataset].input_shape))
        # log_softmax output would have logsumexp == 0 in every row.
        assert not torch.allclose(torch.logsumexp(out, dim=1), torch.zeros(4), atol=1e-3)


def _std_ratio(weight: torch.Tensor, fan: int) -> float:
    return weight.detach().std().item() / math.sqrt(2.0 / fan)


def test_imagenet_resnet50_fanin_and_classic_init() -> None:
    torch.manual_seed(0)
    # layer1.0.conv3 is a 1x1 conv 64 -> 256: fan_in = 64, fan_out = 256, so the two inits differ 2x.
    fanin = create_model("resnet50", "imagenet", num_classes=1000)  # default init is "fanin"
    assert abs(_std_ratio(fanin.layer1[0].conv3.weight, 64) - 1) < 0.1
    assert abs(_std_ratio(fanin.layer4[0].conv2.weight, 512 * 9) - 1) < 0.1
    assert abs(_std_ratio(fanin.conv1.weight, 3 * 7 * 7) - 1) < 0.1
    for m in fanin.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    bound = 1 / math.sqrt(2048)  # FC keeps nn.Linear's default U(-1/sqrt(fan_in), ...)
    assert fanin.fc.weight.abs().max() <= bound and fanin.fc.weight.abs().max() > 0.9 * bound

    classic = create_model("resnet50", "imagenet", num_classes=1000, init="classic")
    assert abs(_std_ratio(classic.layer1[0].conv3.weight, 256) - 1) < 0.1

    with pytest.raises(ValueError, match="init"):
        create_model("resnet50", "imagenet", num_classes=1000, init="xavier")


def test_imagenet_resnet18_is_torchvisions_with_the_same_inits() -> None:
    torch.manual_seed(0)
    small = create_model("resnet18", "imagenet", num_classes=1000)
    assert isinstance(small, torchvision.models.ResNet)
    assert counts(small) == (11_689_512, 11_678_912)
    # layer2.0.downsample.0 is a 1x1 conv 64 -> 128: fan_in 64, fan_out 128.
    assert abs(_std_ratio(small.layer2[0].downsample[0].weight, 64) - 1) < 0.1
    classic = create_model("resnet18", "imagenet", num_classes=1000, init="classic")
    assert abs(_std_ratio(classic.layer2[0].downsample[0].weight, 128) - 1) < 0.1
    assert not isinstance(create_model("ResNet-18", "cifar10", num_classes=10), torchvision.models.ResNet)
    assert create_model("resnet18", "imagenet", num_classes=3)(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="init"):
        create_model("resnet18", "imagenet", num_classes=1000, init="xavier")


def test_wrn_and_vgg19_init() -> None:
    torch.manual_seed(0)
    wrn = create_model("wrn-16-8", "cifar10", num_classes=10)
    conv = wrn.block3.layer[1].conv1  # 512 -> 512, 3x3: fan_out = 9 * 512
    assert abs(_std_ratio(conv.weight, 9 * 512) - 1) < 0.1
    assert torch.all(wrn.fc.bias == 0)
    assert wrn.block1.layer[0].drop_rate == 0.3
    assert create_model("wrn-28-10", "cifar10", num_classes=10).block1.layer[0].drop_rate == 0.0
    assert create_model("wrn-16-8", "cifar10", num_classes=10, drop_rate=0.0).block1.layer[0].drop_rate == 0.0

    vgg = create_model("vgg19", "cifar100", num_classes=100)
    assert abs(_std_ratio(vgg.feature[-3].weight, 9 * 512) - 1) < 0.1
    assert abs(vgg.classifier.weight.std().item() - 0.01) < 0.001
    assert torch.all(vgg.classifier.bias == 0)
