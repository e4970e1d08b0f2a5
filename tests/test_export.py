"""itop-eval and itop-export on real checkpoints, and --initial-checkpoint.

A tiny SET run on the bundled digits (one process) is evaluated by itop-eval (the same test
accuracy and loss as the run's own last evaluation, to the bit) and exported (the weights load
strictly into a fresh model and give the same accuracy; the masks are the checkpoint's; the
card's density is the run's). A 2-process FSDP run's checkpoint evaluates to the run's final
test accuracy. A GMP run started from a dense export starts from exactly those weights. Bad
input ends with one line and exit status 2.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import models
from data_pipelines import DataConfig, build_loaders
from itop_dist.state import saved_masks
from launcher import evaluate as itop_eval
from launcher import export as itop_export
from launcher.checkpoint import read_state

REPO = pathlib.Path(__file__).resolve().parents[1]
ACCELERATE = pathlib.Path(sys.executable).parent / "accelerate"
COMMON = "--data digits --model digits-mlp --epochs 1 --batch-size 64 --no-wandb --no-plots --no-progress --device cpu"
# The brief's tiny run, with mask updates every 8 steps so that the masks have moved (2 updates).
SPARSE = f"--sparse {COMMON} --density 0.1 --update_frequency 8"
DENSE = f"{COMMON} --lr 0.05"

pytestmark = pytest.mark.slow  # every test here trains a run first


def train(out: pathlib.Path, flags: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "launcher.train", *shlex.split(flags), "--output-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def records(run: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def last_eval(run: pathlib.Path) -> dict:
    return [r for r in records(run) if "test/acc" in r][-1]


def summary(run: pathlib.Path) -> dict:
    return [r for r in records(run) if r.get("summary")][-1]


def last_checkpoint(run: pathlib.Path) -> pathlib.Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def run_here(capsys, module: str, *args: str) -> subprocess.CompletedProcess:
    """:func:`run_cli` without an interpreter start: the entry point's ``main`` in this process."""
    capsys.readouterr()
    code = importlib.import_module(module).main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess([module, *args], code, out.out, out.err)


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("export") / "sparse"
    train(out, SPARSE)
    return out


@pytest.fixture(scope="module")
def sparse_export(sparse_run, tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("export") / "sparse-export"
    assert itop_export.main([str(last_checkpoint(sparse_run)), "--output", str(out), "--device", "cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def dense_export(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("export")
    train(root / "dense", DENSE)
    assert itop_export.main([str(root / "dense"), "--output", str(root / "dense-export"), "--device", "cpu"]) == 0
    return root / "dense-export"


def test_eval_gives_the_runs_own_test_accuracy_to_the_bit(sparse_run):
    proc = run_cli("launcher.evaluate", str(last_checkpoint(sparse_run)), "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    record, final = last_eval(sparse_run), summary(sparse_run)
    assert result["test"]["acc"] == record["test/acc"]
    assert result["test"]["loss"] == record["test/loss"]
    assert result["val"] is None  # digits has no validation split
    assert result["density"] == final["final_density"]
    assert result["flops"]["test_rel"] == pytest.approx(final["test_flops_rel"], rel=1e-12)
    # the plain output says the same, per layer with --layers; a run folder means its newest checkpoint
    script = pathlib.Path(sys.executable).parent / "itop-eval"  # the console script (pip install -e .)
    text = subprocess.run([str(script), str(sparse_run), "--device", "cpu", "--layers"], cwd=REPO,
                          capture_output=True, text=True, timeout=600).stdout
    assert f"test acc {record['test/acc']:.4f}" in text and "fc2.weight" in text
    assert f"density {final['final_density']:.4f}" in text


def test_export_loads_into_a_fresh_model_and_reproduces_the_accuracy(sparse_run, sparse_export):
    card = json.loads((sparse_export / "card.json").read_text())
    ckpt = last_checkpoint(sparse_run)
    assert card["accuracy"]["test_acc"] == last_eval(sparse_run)["test/acc"]
    assert card["accuracy"]["source"].startswith("itop-eval")
    assert card["density"] == summary(sparse_run)["final_density"]
    assert card["method"] == "SET" and card["config"]["sparsity"]["density"] == 0.1
    # the weights: strict load into models.create_model, accuracy recomputed here
    model = models.create_model(card["model"], card["model_dataset"], num_classes=card["num_classes"])
    state = load_file(str(sparse_export / "model.safetensors"))
    model.load_state_dict(state, strict=True)
    model.eval()
    cfg = card["config"]["data"]
    loaders = build_loaders(DataConfig(name="digits", test_batch_size=cfg["test_batch_size"]),
                            seed=card["config"]["seed"])
    correct = count = 0
    loaders.test.set_epoch(0)
    with torch.no_grad():
        for x, y in loaders.test:
            correct += int((model(x).argmax(1) == y).sum())
            count += y.numel()
    assert correct / count == card["accuracy"]["test_acc"]
    # the masks: the checkpoint's, round(density * numel) per layer, weights zero where off
    masks = load_file(str(sparse_export / "masks.safetensors"))
    saved = saved_masks(read_state(ckpt, "sparse_state")["state"]["masks"])
    assert masks.keys() == saved.keys() == card["layers"].keys()
    for name, mask in masks.items():
        assert mask.dtype == torch.bool
        assert torch.equal(mask, saved[name])
        assert int(mask.sum()) == round(card["layers"][name] * mask.numel())
        assert not state[name][~mask].any()


@pytest.mark.dist
def test_a_sharded_two_process_run_evaluates_to_its_final_accuracy(tmp_path):
    out = tmp_path / "fsdp"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(port),
           "-m", "launcher.train", *shlex.split(SPARSE.replace("--batch-size 64", "--batch-size 32")),
           "--sharding", "fsdp", "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = summary(out)
    assert final["world_size"] == 2 and final["sharding"] == "zero3"
    checkpoint = last_checkpoint(out)
    assert not (checkpoint / "model.safetensors").exists()  # each rank wrote its blocks
    assert sorted(p.name for p in checkpoint.glob("model-shard-*.safetensors")) == [
        "model-shard-0.safetensors", "model-shard-1.safetensors"]
    proc = run_cli("launcher.evaluate", str(checkpoint), "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["test"]["acc"] == pytest.approx(final["final_test_acc"], abs=1e-6)
    assert result["density"] == final["final_density"]
    # itop-export assembles one plain state dict from the blocks; its card measures the same.
    proc = run_cli("launcher.export", str(checkpoint), "--output", str(tmp_path / "export"))
    assert proc.returncode == 0, proc.stderr
    card = json.loads((tmp_path / "export" / "card.json").read_text())
    assert card["accuracy"]["test_acc"] == pytest.approx(final["final_test_acc"], abs=1e-6)
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert exported["fc2.weight"].shape == (256, 256)


def test_gmp_from_a_dense_export_starts_from_those_weights(dense_export, sparse_export, tmp_path):
    from launcher.config import parse_config
    from launcher.trainer import Trainer

    card = json.loads((dense_export / "card.json").read_text())
    assert card["method"] == "dense" and card["density"] == 1.0
    assert load_file(str(dense_export / "masks.safetensors")) == {}
    exported = load_file(str(dense_export / "model.safetensors"))
    flags = (f"--sparse --method GMP --init-density 1 --final-density 0.1 --final-prune-epoch 0.5 --update_frequency 8 {DENSE} "
             f"--initial-checkpoint {dense_export} --output-dir {tmp_path / 'gmp'}")
    trainer = Trainer(parse_config(shlex.split(flags)))
    try:
        weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        assert weights.keys() == exported.keys()
        assert all(torch.equal(weights[n], exported[n]) for n in exported)  # step 0: the export
        _, acc = trainer.evaluate_model(trainer.loaders.test)
        assert acc == card["accuracy"]["test_acc"]
    finally:
        trainer.close()
    # A sparse export's masks are not used: the run's own init decides them.
    runs = {}
    for name, extra in (("own", ""), ("from-export", f"--initial-checkpoint {sparse_export}")):
        t = Trainer(parse_config(shlex.split(f"{SPARSE} --output-dir {tmp_path / name} {extra}")))
        try:
            runs[name] = {n: m.clone() for n, m in t.sparsifier.masks.items()}
        finally:
            t.close()
    assert runs["own"].keys() == runs["from-export"].keys()
    assert all(torch.equal(runs["own"][n], runs["from-export"][n]) for n in runs["own"])


def test_initial_checkpoint_of_another_model_is_refused_naming_the_tensor(dense_export, tmp_path, capsys):
    from launcher.train import main

    state = load_file(str(dense_export / "model.safetensors"))
    state["fc2.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    flags = f"{DENSE} --initial-checkpoint {tmp_path / 'bad.safetensors'} --output-dir {tmp_path / 'run'}"
    assert main(shlex.split(flags)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("itop-train: error: --initial-checkpoint") and "fc2.weight" in err[0]
    assert not (tmp_path / "run").exists()
    assert main(shlex.split(f"{DENSE} --initial-checkpoint {tmp_path} --output-dir {tmp_path / 'run'}")) == 2
    assert "model.safetensors" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2


def one_line_error(proc: subprocess.CompletedProcess, prog: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    return lines[0]


def rewrite_manifest(ckpt: pathlib.Path, name: str) -> None:
    """Re-sign one file in the manifest (a checkpoint that verifies but lies)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / name).read_bytes()
    manifest["files"][name] = {**manifest["files"][name], "size": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_eval_and_export_refuse_what_is_not_a_good_checkpoint(sparse_run, tmp_path, capsys):
    """The first refusal through the command line, the rest through ``main`` in this process."""
    line = one_line_error(run_cli("launcher.evaluate", str(tmp_path)), "itop-eval")
    assert "is not a checkpoint" in line
    line = one_line_error(run_here(capsys, "launcher.evaluate", str(tmp_path / "nothing")), "itop-eval")
    assert "does not exist" in line
    damaged = tmp_path / "damaged"
    shutil.copytree(last_checkpoint(sparse_run), damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (damaged / "model.safetensors").write_bytes(bytes(data))
    line = one_line_error(run_here(capsys, "launcher.evaluate", str(damaged)), "itop-eval")
    assert "model.safetensors" in line and "SHA-256" in line
    # weights that are not zero where the mask is off: refused even with a valid manifest
    liar = tmp_path / "liar"
    shutil.copytree(last_checkpoint(sparse_run), liar)
    state = load_file(str(liar / "model.safetensors"))
    state["fc2.weight"] = torch.ones_like(state["fc2.weight"])
    save_file(state, str(liar / "model.safetensors"))
    rewrite_manifest(liar, "model.safetensors")
    line = one_line_error(run_here(capsys, "launcher.evaluate", str(liar)), "itop-eval")
    assert "fc2.weight" in line and "mask is off" in line
    line = one_line_error(run_here(capsys, "launcher.export", str(liar), "--output", str(tmp_path / "x")), "itop-export")
    assert "mask is off" in line and not (tmp_path / "x").exists()
    # export refuses a non-empty output folder unless --force
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    line = one_line_error(run_here(capsys, "launcher.export", str(sparse_run), "--output", str(tmp_path / "full")),
                          "itop-export")
    assert "not empty" in line and "--force" in line
    proc = run_here(capsys, "launcher.export", str(sparse_run), "--output", str(tmp_path / "full"), "--force", "--no-eval")
    assert proc.returncode == 0, proc.stderr
    card = json.loads((tmp_path / "full" / "card.json").read_text())
    assert card["accuracy"]["val_acc"] == last_eval(sparse_run)["val/acc"]
    assert "meta.json" in card["accuracy"]["source"] and (tmp_path / "full" / "keep.txt").exists()
