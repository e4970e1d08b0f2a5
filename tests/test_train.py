"""The trainer: the papers' commands, the quick start, resume, checkpoints, bad input."""

import json
import pathlib
import shlex
import subprocess
import sys

import pytest
import torch

from launcher.config import ConfigError, TrainConfig, parse_config

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED_COMMON = ("--seed 18 --sparse_init ERK --lr 0.1 --density 0.05 --epochs 250 --model vgg-c "
               "--data cifar10 --decay_frequency 30000 --batch-size 128 --death magnitude "
               "--redistribution none")
# The ITOP README's CIFAR commands, exactly (dense; SET-ITOP; RigL-ITOP; both extended 5x),
# with the config file that holds each recipe.
SEED_COMMANDS = {
    "cifar10_vgg-c_dense.yaml": f"{SEED_COMMON} --multiplier 1 --update_frequency 1500 --growth random",
    "cifar10_vgg-c_set_itop.yaml": f"--sparse {SEED_COMMON} --multiplier 1 --update_frequency 1500 --growth random",
    "cifar10_vgg-c_rigl_itop.yaml": f"--sparse {SEED_COMMON} --multiplier 1 --update_frequency 4000 --growth gradient",
    "cifar10_vgg-c_set_itop_5x.yaml": f"--sparse {SEED_COMMON} --multiplier 5 --update_frequency 1500 --growth random",
    "cifar10_vgg-c_rigl_itop_5x.yaml": f"--sparse {SEED_COMMON} --multiplier 5 --update_frequency 4000 --growth gradient",
}


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(args: str, tmp_path: pathlib.Path, name: str = "run") -> pathlib.Path:
    """Run the real entry point in a fresh process; return the run folder."""
    out = tmp_path / name
    cmd = [sys.executable, "-m", "launcher.train", *shlex.split(args), "--output-dir", str(out),
           "--no-progress", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("recipe", sorted(SEED_COMMANDS))
def test_seed_commands_parse_as_the_papers_mean_them(recipe):
    cfg = parse_config(shlex.split(SEED_COMMANDS[recipe]))
    assert cfg.model.name == "vgg-c" and cfg.data.name == "cifar10" and cfg.seed == 18
    assert cfg.data.batch_size == 128 and cfg.optim.lr == 0.1 and cfg.schedule.epochs == 250
    assert cfg.sparsity.density == 0.05 and cfg.sparsity.sparse_init == "ERK"
    assert cfg.sparse == ("--sparse" in SEED_COMMANDS[recipe].split())
    assert cfg.sparsity.growth == ("gradient" if "rigl" in recipe else "random")
    assert cfg.sparsity.update_frequency == (4000 if "rigl" in recipe else 1500)
    assert cfg.schedule.multiplier == (5 if "5x" in recipe else 1)
    # The recipe file says the same as the command line.
    from_file = parse_config(["--config", str(REPO / "configs" / recipe)])
    assert from_file.to_dict() == {**cfg.to_dict(), "schedule": {**cfg.to_dict()["schedule"], "decay_frequency": None}}


def test_underscore_and_dash_spellings_are_one_flag():
    a = parse_config(["--update_frequency", "7", "--death-rate", "0.3", "--sparse_init", "uniform"])
    b = parse_config(["--update-frequency", "7", "--death_rate", "0.3", "--sparse-init", "uniform"])
    assert a == b and a.sparsity.update_frequency == 7


def test_cli_overrides_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 3\n[sparsity]\ndensity = 0.2\ngrowth = "gradient"\n')
    cfg = parse_config(["--config", str(path), "--density", "0.1"])
    assert cfg.seed == 3 and cfg.sparsity.growth == "gradient" and cfg.sparsity.density == 0.1


@pytest.mark.parametrize("args,flag", [
    ("--density 0", "--density"), ("--density 1.2", "--density"),
    ("--update_frequency 0", "--update_frequency"), ("--model resnet9000", "resnet50"),
    ("--growth sideways", "--growth"), ("--method GraNetX", "--method"),
    ("--model lenet5 --data cifar10", "--data"), ("--data imagenet2", "--data"),
    ("--lr -1", "--lr"), ("--mixed-precision fp8", "--mixed-precision"),
    ("--epochs x", "--epochs"), ("--no-such-flag 1", "--no-such-flag"),
])
def test_bad_settings_fail_with_the_flag_named(args, flag):
    with pytest.raises(ConfigError, match=flag.replace("-", r"\-") if flag.startswith("--") else flag):
        parse_config(shlex.split(args))


def test_bad_input_exits_2_with_one_line_and_no_run_folder(tmp_path):
    for args in ("--density 1.5", "--data cifar10 --model vgg-c --data-dir /nonexistent/cifar",
                 "--config /nonexistent.yaml"):
        out = tmp_path / "never"
        proc = subprocess.run([sys.executable, "-m", "launcher.train", *shlex.split(args),
                               "--output-dir", str(out)], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("itop-train: error:"), proc.stderr
        assert not (out / "checkpoints").exists()


QUICK = "--data digits --model digits-mlp --epochs 30 --batch-size 64 --lr 0.05 --update_frequency 50 --seed 1"


@pytest.mark.parametrize("mode,extra,floor", [
    ("dense", "", 0.95),
    ("set", "--sparse --density 0.05 --growth random", 0.90),
    ("rigl", "--sparse --density 0.05 --growth gradient", 0.90),
])
def test_digits_quick_start_trains(tmp_path, mode, extra, floor):
    run = train(f"{QUICK} {extra}", tmp_path, mode)
    records = read_metrics(run)
    summary = records[-1]
    assert summary["summary"] and summary["final_test_acc"] >= floor, summary
    assert (run / "config.yaml").is_file()
    train_logs = [r for r in records if "train/loss" in r]
    assert train_logs and all({"step", "epoch", "train/lr", "sparsity/density"} <= set(r) for r in train_logs)
    assert train_logs[0]["train/loss"] > train_logs[-1]["train/loss"]
    evals = [r for r in records if "val/acc" in r]
    assert len(evals) == 30 and all(0 <= r["val/acc"] <= 1 for r in evals)
    if mode != "dense":
        assert abs(summary["final_density"] - 0.05) < 0.001
        assert summary["final_rate"] > 0.1  # ITOP rate: explored twice the weights ever active at once
        assert any("mask/pruned" in r for r in records)


def test_resume_matches_uninterrupted_run_bitwise(tmp_path):
    args = ("--sparse --data digits --model digits-mlp --epochs 3 --batch-size 64 --density 0.1 "
            "--growth gradient --update_frequency 10 --seed 5")
    full = train(args, tmp_path, "full")
    # Stopped mid-epoch (epochs have 22 steps), then resumed to the end.
    part = train(f"{args} --max-steps 31", tmp_path, "part")
    assert (part / "checkpoints").is_dir()
    train(f"{args} --resume auto", tmp_path, "part")
    a = torch.load(next((full / "checkpoints").glob("step-00000066")) / "custom_checkpoint_1.pkl",
                   weights_only=False)
    b = torch.load(next((part / "checkpoints").glob("step-00000066")) / "custom_checkpoint_1.pkl",
                   weights_only=False)
    assert a["state"]["masks"].keys() == b["state"]["masks"].keys()
    for name in a["state"]["masks"]:
        assert torch.equal(a["state"]["masks"][name]["bits"], b["state"]["masks"][name]["bits"])
        assert torch.equal(a["state"]["fired"][name]["bits"], b["state"]["fired"][name]["bits"])
    from safetensors.torch import load_file
    wa = load_file(full / "checkpoints" / "step-00000066" / "model.safetensors")
    wb = load_file(part / "checkpoints" / "step-00000066" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_metrics(full)[-1]["final_rate"] == read_metrics(part)[-1]["final_rate"]


def test_resume_refuses_another_sparse_setup(tmp_path):
    args = "--sparse --data digits --model digits-mlp --epochs 1 --batch-size 64 --density 0.1"
    run = train(args, tmp_path, "a")
    proc = subprocess.run([sys.executable, "-m", "launcher.train", *shlex.split(args.replace("0.1", "0.2")),
                           "--resume", "auto", "--output-dir", str(run), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "sparsity.density=0.1" in proc.stderr, proc.stderr


def test_checkpoints_are_atomic_and_pruned(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from launcher.trainer import Trainer

    cfg = parse_config(shlex.split(
        f"--sparse --data digits --model digits-mlp --epochs 4 --batch-size 64 --keep-last 2 "
        f"--output-dir {tmp_path / 'r'} --device cpu --no-progress"))
    trainer = Trainer(cfg)
    trainer.fit()
    done = trainer.checkpointer.complete()
    best = trainer.checkpointer.best()
    assert len(done) <= 3 and done[-1].name == "step-00000088" and best in done
    # A crash in the middle of the next save leaves every complete checkpoint as it was.
    real_save = Accelerator.save_state

    def crash(self, output_dir=None, **kw):
        real_save(self, output_dir, **kw)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(Accelerator, "save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.checkpointer.save(99, {"step": 99}, is_best=True)
    assert trainer.checkpointer.complete() == done and trainer.checkpointer.best() == best
    assert trainer.checkpointer.resolve("auto") == done[-1]
    trainer.close()
