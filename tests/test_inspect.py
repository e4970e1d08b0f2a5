"""itop-inspect: the plan a user reads before launching a long job."""

import json
import pathlib
import subprocess
import sys

import pytest

BIN = pathlib.Path(sys.executable).parent


def run(*args: str) -> subprocess.CompletedProcess:
    script = BIN / "itop-inspect"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "launcher.inspect"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120)


def test_console_script_is_installed():
    assert (BIN / "itop-inspect").exists(), "pip install -e . must install the itop-inspect script"


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
        assert set(layer) == {"name", "shape", "density", "nonzeros", "numel"}
        assert layer["nonzeros"] == round(layer["density"] * layer["numel"])


def test_resnet50_imagenet_table():
    out = run("--model", "resnet50", "--data", "imagenet", "--density", "0.2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert sum(line.split()[0].endswith(".weight") for line in lines if line.strip()) == 54
    total = next(line for line in lines if line.startswith("total (masked)"))
    assert total.split()[2] == "0.2000" and "25,502,912" in total


def test_bad_input_one_line_and_nonzero_exit():
    out = run("--model", "resnet51", "--density", "0.2")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "resnet50" in out.stderr  # the known names are listed
    out = run("--model", "vgg-c", "--density", "1.5")
    assert out.returncode == 2 and "--density" in out.stderr
    out = run("--model", "lenet5", "--data", "imagenet")
    assert out.returncode == 2 and "mnist" in out.stderr
