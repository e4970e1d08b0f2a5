"""itop-inspect: the plan a user reads before launching a long job."""

import json
import pathlib
import subprocess
import sys

import pytest

from launcher.plan import main

BIN = pathlib.Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess:
    script = BIN / "itop-inspect"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "launcher.plan"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120)


def test_console_script_is_installed():
    assert (BIN / "itop-inspect").exists(), "pip install -e . must install the itop-inspect script"


@pytest.mark.slow
def test_vgg_c_erk_json():
    out = run("--model", "vgg-c", "--density", "0.05", "--sparse-init", "ERK", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    layers = {layer["name"]: layer for layer in plan["layers"]}
    assert plan["masked_params"] == 11_307_712 and plan["total_params"] == 11_323_466
    assert abs(plan["total_density"] - 0.05) * plan["masked_params"] <= len(layers)
    assert layers["features.0.weight"]["density"] == 1.0
    assert layers["features.20.weight"]["density"] == pytest.approx(0.3804, abs=1e-4)
    assert layers["features.20.weight"]["shape"] == [256, 256, 1, 1]
    for layer in plan["layers"]:
        assert set(layer) == {"name", "shape", "density", "nonzeros", "numel", "flops"}
        assert layer["nonzeros"] == round(layer["density"] * layer["numel"])
    # vgg-c's first conv on a 32x32 CIFAR image: 2 x 27 MACs x 64 x 32 x 32 outputs
    assert layers["features.0.weight"]["flops"] == 2 * 27 * 64 * 32 * 32
    assert set(plan["flops"]) == {"dense", "sparse", "test_rel"}  # no method given: no train_rel
    assert "growth" not in plan


@pytest.mark.slow
def test_resnet50_imagenet_table():
    out = run("--model", "resnet50", "--data", "imagenet", "--density", "0.2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum(line.split()[0].endswith(".weight") for line in lines if line.strip()) == 54
    total = next(line for line in lines if line.startswith("total (masked)"))
    assert total.split()[2] == "0.2000" and "25,502,912" in total
    assert total.split()[5:] == ["8.18G", "3.38G"]  # dense and sparse FLOPs per image
    assert any("3x224x224" in line and "0.414x dense" in line for line in lines)


@pytest.mark.slow
def test_resnet50_imagenet_json_flops():
    """FLOPs per 224x224 image at ERK 0.2, docs/algorithms.md §8 [measured]: 8.18e9 dense, 0.414x."""
    out = run("--model", "resnet50", "--data", "imagenet", "--density", "0.2", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    flops = plan["flops"]
    assert set(flops) == {"dense", "sparse", "test_rel"}
    assert flops["dense"] == pytest.approx(8.18e9, rel=5e-3)
    assert flops["test_rel"] == pytest.approx(0.414, rel=5e-3)
    assert flops["dense"] == sum(layer["flops"] for layer in plan["layers"])
    layers = plan["layers"]
    assert flops["sparse"] == pytest.approx(sum(la["density"] * la["flops"] for la in layers))
    assert flops["test_rel"] == pytest.approx(flops["sparse"] / flops["dense"])


@pytest.mark.parametrize("flags,growth,update_frequency,expected", [
    (["--growth", "gradient"], "gradient", 100, lambda test_rel: 0.244),  # RigL, docs/algorithms.md §8 [measured]
    (["--update-frequency", "4000"], "random", 4000, lambda test_rel: test_rel),  # SET: 3 f_S
    (["--growth", "momentum", "--update_frequency", "50"], "momentum", 50,
     lambda test_rel: (2 * test_rel + 1) / 3),  # sparse momentum: (2 f_S + f_D) / 3 f_D
])
def test_train_rel_for_a_method(capsys, flags, growth, update_frequency, expected):
    args = ["--model", "resnet50", "--data", "imagenet", "--density", "0.1", *flags]
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    flops = plan["flops"]
    assert (plan["growth"], plan["update_frequency"]) == (growth, update_frequency)
    assert flops["train_rel"] == pytest.approx(expected(flops["test_rel"]), rel=5e-3)
    assert main(args) == 0
    table = capsys.readouterr().out
    line = f"{growth} growth every {update_frequency} steps: {flops['train_rel']:.3f}x dense"
    assert line in table


@pytest.mark.slow
def test_bad_input_one_line_and_nonzero_exit():
    out = run("--model", "resnet51", "--density", "0.2")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "resnet50" in out.stderr  # the known names are listed
    out = run("--model", "vgg-c", "--density", "1.5")
    assert out.returncode == 2 and "--density" in out.stderr
    out = run("--model", "lenet5", "--data", "imagenet")
    assert out.returncode == 2 and "mnist" in out.stderr


def test_bad_update_frequency_names_the_flag(capsys):
    assert main(["--model", "vgg-c", "--update-frequency", "0"]) == 2
    assert "--update_frequency" in capsys.readouterr().err
