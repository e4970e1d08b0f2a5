"""The trainer: the papers' commands, the quick start, resume, checkpoints, bad input."""

import json
import pathlib
import shlex
import subprocess
import sys

import pytest
import torch

from launcher.checkpoint import read_state
from launcher.config import ConfigError, TrainConfig, parse_config

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED_COMMON = ("--seed 18 --sparse_init ERK --lr 0.1 --density 0.05 --epochs 250 --model vgg-c "
               "--data cifar10 --decay_frequency 30000 --batch-size 128 --death magnitude "
               "--redistribution none")
# The ITOP README's CIFAR commands, exactly (dense; SET-ITOP; RigL-ITOP; both extended 5x),
# with the config file that holds each recipe.
SEED_COMMANDS = {
    "cifar10_vgg-c_dense.yaml": f"--dense {SEED_COMMON} --multiplier 1 --update_frequency 1500 --growth random",
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


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(SEED_COMMANDS))
def test_seed_commands_run_on_a_tiny_on_disk_cifar(recipe, fake_cifar10_large, tmp_path):
    """The README command as written trains. Added: the data folder, a step limit, and an update
    frequency that fits the 2-step epochs of the tiny set (the recipe's 1500/4000 would never fire
    there, which the schedule check refuses)."""
    from launcher.trainer import Trainer

    out = tmp_path / "run"
    cfg = parse_config(shlex.split(SEED_COMMANDS[recipe]) + [
        "--data-dir", str(fake_cifar10_large.root), "--max-steps", "2", "--output-dir", str(out),
        "--device", "cpu", "--no-progress", "--update_frequency", "50"])
    trainer = Trainer(cfg)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    # measured on the 30 test images, each counted once: a whole number of them right
    right = summary["final_test_acc"] * len(fake_cifar10_large.test_y)
    assert summary["step"] == 2 and len(fake_cifar10_large.test_y) == 30 and right == pytest.approx(round(right))
    assert trainer.loaders.train.num_samples == 180 and trainer.loaders.val.num_samples == 20
    if cfg.sparse:
        assert abs(summary["final_density"] - 0.05) < 1e-4
    assert (out / "checkpoints").is_dir() and (out / "config.yaml").is_file()


def _settings(cls, prefix=""):
    """Dotted paths of every leaf field of a config dataclass."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _settings(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


TRAINING_PATH = ["itop_dist", "data_pipelines", "models", "launcher/config.py", "launcher/trainer.py",
                 "launcher/checkpoint.py", "launcher/parallel.py", "launcher/preemption.py",
                 "launcher/events.py", "launcher/lr_schedule.py", "launcher/plugins", "launcher/tracking.py",
                 "launcher/train.py"]
OTHER_TOOLS_FLAGS = {"--multi_gpu", "--num_processes", "--mixed_precision", "--main_process_port",  # accelerate
                     "--signal", "--requeue"}  # sbatch


@pytest.mark.slow
def test_every_setting_has_a_flag_and_every_flag_a_message_names_exists():
    """The flag table and the messages cannot drift from the config: every field can be set on
    the command line, and every ``--flag`` in a string of the training path is one itop-train
    (or accelerate launch, sbatch) accepts."""
    import io
    import re
    import tokenize

    from launcher.config import LAUNCHER_ONLY, SHORTHANDS, TrainConfig, accepted_flags, cli_flags

    assert set(_settings(TrainConfig)) - set(cli_flags()) == {"sparsity.seed"}  # = --seed
    accepted = set(accepted_flags()) | set(SHORTHANDS) | set(LAUNCHER_ONLY) | OTHER_TOOLS_FLAGS | {"--help"}
    files = [f for entry in TRAINING_PATH for f in ([REPO / entry] if entry.endswith(".py")
                                                    else sorted((REPO / entry).rglob("*.py")))]
    named = {}
    for path in files:
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.STRING:
                # (a flag followed by an f-string field is a template: f"--no-{name}")
                for flag in re.findall(r"(?<![\w-])--[a-zA-Z][\w-]*[a-zA-Z0-9](?![\w{-])", tok.string):
                    named.setdefault(flag, f"{path.relative_to(REPO)}:{tok.start[0]}")
    unknown = {flag: where for flag, where in named.items() if flag not in accepted}
    for flag in list(unknown):  # the papers' spellings translated before parsing (--first_m ...)
        try:
            parse_config([flag, "1"])
        except ConfigError as err:
            if "no such flag" in str(err):
                continue
        del unknown[flag]
    assert not unknown, unknown
    # and the flags added for fields that had none set what they name
    cfg = parse_config(shlex.split("--sparse --exclude conv1.weight,fc.weight --death-rate-min 0.01 "
                                   "--mask-apply bool --exact-init false --threshold 0.002 --gamma 0.2 "
                                   "--data synthetic --synthetic-shape 1,8,8 --synthetic-classes 3 "
                                   "--synthetic-size 64 --loader-channels-last true --mask-momentum false"))
    assert cfg.sparsity.exclude == ("conv1.weight", "fc.weight") and cfg.sparsity.death_rate_min == 0.01
    assert (cfg.sparsity.apply_mode, cfg.sparsity.exact_init, cfg.sparsity.threshold) == ("bool", False, 0.002)
    assert cfg.sparsity.mask_momentum is False and cfg.schedule.gamma == 0.2 and cfg.data.channels_last
    assert (cfg.data.synthetic_shape, cfg.data.synthetic_classes, cfg.data.synthetic_size) == ((1, 8, 8), 3, 64)


def test_underscore_and_dash_spellings_are_one_flag():
    a = parse_config(["--sparse", "--update_frequency", "7", "--death-rate", "0.3", "--sparse_init", "uniform"])
    b = parse_config(["--sparse", "--update-frequency", "7", "--death_rate", "0.3", "--sparse-init", "uniform"])
    assert a == b and a.sparsity.update_frequency == 7


def test_help_lists_every_section_with_defaults_choices_and_aliases(capsys):
    from launcher.train import main

    with pytest.raises(SystemExit) as exit:
        main(["--sparse", "--help"])
    out = capsys.readouterr().out
    assert exit.value.code in (0, None)
    for section in ("model", "data", "sparsity", "optim", "schedule", "checkpoint", "log", "tickets"):
        assert f"{section} options" in out, section
    assert "--growth {random,gradient,momentum}" in out and "--optimizer {sgd,adam,adamw}" in out
    assert "--preset {imagenet}" in out and "(also --l2, --wd)" in out and "(default: 0.0005)" in out


@pytest.mark.parametrize("args,line", [
    ("--densty 0.1", "--densty: no such flag; did you mean --density?"),
    ("--sparse --update_frequncy 7", "--update_frequncy: no such flag; did you mean --update-frequency?"),
    ("--lr", "--lr: expected a value (FLOAT)"),
    ("--nesterov maybe", "--nesterov: must be true or false, got 'maybe'"),
    ("--epochs ten", "--epochs: must be a number, got 'ten'"),
])
def test_a_typo_or_bad_value_is_one_line_with_the_fix(capsys, args, line):
    from launcher.train import main

    assert main(shlex.split(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"itop-train: error: {line}"), err


def test_choices_match_in_any_case(tmp_path):
    cfg = parse_config(shlex.split("--sparse --growth Gradient --method granet --optimizer ADAM --data CIFAR10 "
                                   "--model vgg-c --init-density 0.5 --final-density 0.1 --lr-schedule Cosine"))
    assert (cfg.sparsity.growth, cfg.sparsity.method, cfg.optim.name) == ("gradient", "GraNet", "adam")
    assert (cfg.data.name, cfg.schedule.lr_schedule) == ("cifar10", "cosine")
    path = tmp_path / "c.yaml"
    path.write_text("sparse: true\nsparsity: {death: set, sparse_init: erk}\ntickets: {superposing: cima}\n")
    cfg = parse_config(["--config", str(path)])
    assert (cfg.sparsity.death, cfg.sparsity.sparse_init, cfg.tickets.superposing) == ("SET", "ERK", "CIMA")


ROUND_TRIP = ["cifar10_vgg-c_rigl_itop.yaml", "cifar10_vgg-c_dense.yaml", "cifar10_resnet50_granet_si0.5_d0.05.yaml",
              "cifar100_resnet50_suptickets_granet.yaml", "imagenet_resnet50_suptickets_rigl.yaml",
              "imagenet_resnet50_rigl_itop_d0.1_2x.yaml"]


@pytest.mark.parametrize("recipe", ROUND_TRIP)
def test_a_runs_saved_config_loads_back_as_the_same_config(recipe, tmp_path):
    """config.yaml, as the trainer saves it, given back with --config: the same TrainConfig and
    so the same run folder (flags over the recipe included: they are in the saved file)."""
    from launcher.config import save_config

    cfg = parse_config(["--config", str(REPO / "configs" / recipe), "--data-dir", "DATA", "--seed", "5",
                        "--exclude", "conv1.weight", "--save-every", "7"])
    again = parse_config(["--config", str(save_config(cfg, tmp_path))])
    assert again == cfg and again.run_dir == cfg.run_dir
    assert (again.seed, again.sparsity.exclude, again.checkpoint.every_steps) == (5, ("conv1.weight",), 7)


def test_arch_selects_the_imagenet_preset_and_the_saved_config_records_it(tmp_path):
    from launcher.config import save_config

    cfg = parse_config(["--arch", "resnet50", "IMAGENET", "--lr", "0.4"])
    assert (cfg.preset, cfg.data.name, cfg.data.data_dir, cfg.optim.lr) == ("imagenet", "imagenet", "IMAGENET", 0.4)
    assert (cfg.optim.nesterov, cfg.optim.weight_decay, cfg.optim.bn_weight_decay, cfg.mixed_precision) == (
        False, 1e-4, False, "auto")
    saved = save_config(cfg, tmp_path)
    assert "preset: imagenet" in saved.read_text() and parse_config(["--config", str(saved)]) == cfg
    # The same values without the preset are the same run (the preset is where they came from).
    spelled_out = parse_config(shlex.split("--model resnet50 --data imagenet --data-dir IMAGENET --lr 0.4 "
                                           "--nesterov false --l2 1e-4 --bn-weight-decay false --mixed-precision auto"))
    assert spelled_out.preset is None and spelled_out.run_dir == cfg.run_dir
    # Flags lie over the preset; with --data, --arch is only the model.
    assert parse_config(["--preset", "ImageNet", "--model", "resnet50", "--l2", "5e-4"]).optim.weight_decay == 5e-4
    plain = parse_config(["--arch", "ResNet-18", "--data", "cifar10"])
    assert plain.preset is None and plain.optim.nesterov and plain.model.name == "ResNet-18"


def test_cli_overrides_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('seed = 3\nsparse = true\n[sparsity]\ndensity = 0.2\ngrowth = "gradient"\n')
    cfg = parse_config(["--config", str(path), "--density", "0.1"])
    assert cfg.seed == 3 and cfg.sparsity.growth == "gradient" and cfg.sparsity.density == 0.1


@pytest.mark.parametrize("args,flag", [
    ("--density 0", "--density"), ("--density 1.2", "--density"),
    ("--update_frequency 0", "--update_frequency"), ("--model resnet9000", "resnet50"),
    ("--growth sideways", "--growth"), ("--method GraNetX", "--method"),
    ("--model lenet5 --data cifar10", "--data"), ("--data imagenet2", "--data"),
    ("--lr -1", "--lr"), ("--mixed-precision fp8", "--mixed-precision"),
    ("--epochs x", "--epochs"), ("--no-such-flag 1", "--no-such-flag"), ("--preset imagenet2", "--preset"),
])
def test_bad_settings_fail_with_the_flag_named(args, flag):
    with pytest.raises(ConfigError, match=flag.replace("-", r"\-") if flag.startswith("--") else flag):
        parse_config(shlex.split(args))


@pytest.mark.slow
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


@pytest.mark.parametrize("args,line", [
    ("--init foo", "--init: 'foo': choose fanin or classic"),
    ("--exclude fc9.weight", "--exclude fc9.weight matches no conv or linear weight of this model; its "
                             "weights are fc1.weight, fc2.weight, fc3.weight"),
    ("--exclude fc1,fc2,fc3", "--exclude fc1,fc2,fc3 leaves no weight to sparsify"),
])
def test_settings_that_would_not_run_as_written_are_one_line(tmp_path, capsys, args, line):
    from launcher.train import main

    code = main(shlex.split(f"--sparse --data digits --model digits-mlp --device cpu --no-wandb {args}")
                + ["--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and line in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("where", ["launcher.trainer._build_optimizer", "launcher.trainer.build_loaders"])
def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys, where):
    """A ValueError from inside (not bad input: no ConfigError/DataError/CheckpointError) is a
    bug: it propagates with its traceback instead of becoming a one-line exit 2."""
    import importlib

    from launcher.train import main

    module, name = where.rsplit(".", 1)

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(importlib.import_module(module), name, broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["--sparse", "--data", "digits", "--model", "digits-mlp", "--device", "cpu", "--no-wandb",
              "--output-dir", str(tmp_path / "run")])
    assert "itop-train: error" not in capsys.readouterr().err


def readme_quick_start() -> str:
    """The flags of the README's main command (after ``itop-train``)."""
    readme = (REPO / "README.md").read_text()
    line = next(l for l in readme.splitlines() if "bin/itop-train --sparse --data digits" in l)
    return line.split("bin/itop-train", 1)[1]


@pytest.mark.slow
@pytest.mark.parametrize("mode,change,floor", [
    ("set", {}, 0.93),
    ("dense", {"--sparse": "--dense"}, 0.95),
    ("rigl", {"--growth random": "--growth gradient"}, 0.93),
])
def test_digits_quick_start_trains(tmp_path, mode, change, floor):
    args = readme_quick_start()
    for old, new in change.items():
        args = args.replace(old, new)
    run = train(args, tmp_path, mode)
    records = read_metrics(run)
    summary = records[-1]
    assert summary["summary"] and summary["final_test_acc"] >= floor, summary
    assert summary["step"] == 2200  # 100 epochs of 22 batches
    assert (run / "config.yaml").is_file()
    train_logs = [r for r in records if "train/loss" in r]
    assert train_logs and all({"step", "epoch", "train/lr", "sparsity/density"} <= set(r) for r in train_logs)
    assert train_logs[0]["train/loss"] > 2 * train_logs[-1]["train/loss"]
    evals = [r for r in records if "val/acc" in r]
    assert len(evals) == 100 and evals[-1]["val/acc"] >= floor - 0.02
    assert max(r["val/acc"] for r in evals[:5]) < evals[-1]["val/acc"]  # it learned over the run
    if mode != "dense":
        assert abs(summary["final_density"] - 0.05) < 0.001
        assert summary["final_itop_rate"] > 0.1  # explored at least twice the weights active at once
        updates = [r for r in records if "mask/pruned" in r]
        assert len(updates) == 44 and all(r["mask/pruned"] == r["mask/regrown"] for r in updates)
        assert [r["itop/rate"] for r in updates] == sorted(r["itop/rate"] for r in updates)


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_loop_with_bf16(tmp_path):
    out = tmp_path / "acc"
    cmd = [str(pathlib.Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1",
           "--cpu", "--mixed_precision", "bf16", "-m", "launcher.train", "--sparse", "--data", "digits",
           "--model", "digits-mlp", "--epochs", "2", "--batch-size", "64", "--growth", "gradient",
           "--update_frequency", "10", "--mixed-precision", "bf16", "--output-dir", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_metrics(out)[-1]
    assert summary["step"] == 44 and abs(summary["final_density"] - 0.05) < 1e-3


def test_lr_schedule_follows_the_recipes():
    from launcher.config import ScheduleConfig
    from launcher.lr_schedule import lr_factor

    s = ScheduleConfig(epochs=250)
    assert [lr_factor(e * 10, s, 10, 2500) for e in (0, 124, 125, 186, 187)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01])  # decays at int(250/2) and int(3*250/4), as ITOP main.py
    s5 = ScheduleConfig(epochs=250, multiplier=5)
    assert lr_factor(124 * 5 * 10, s5, 10, 12500) == 1 and lr_factor(125 * 5 * 10, s5, 10, 12500) == pytest.approx(0.1)
    w = ScheduleConfig(epochs=100, warmup_epochs=5, milestones=(0.3, 0.6, 0.9))
    assert [lr_factor(e * 10, w, 10, 1000) for e in (0, 4, 5, 30, 60, 90)] == pytest.approx(
        [1 / 6, 5 / 6, 1, 0.1, 0.01, 0.001])
    c = ScheduleConfig(epochs=10, lr_schedule="cosine")
    assert lr_factor(50, c, 10, 100) == pytest.approx(0.5) and lr_factor(100, c, 10, 100) == pytest.approx(0)


@pytest.mark.slow
def test_resume_matches_uninterrupted_run_bitwise(tmp_path):
    args = ("--sparse --data digits --model digits-mlp --epochs 3 --batch-size 64 --density 0.1 "
            "--growth gradient --update_frequency 10 --seed 5")
    full = train(args, tmp_path, "full")
    # Stopped mid-epoch (epochs have 22 steps), then resumed to the end.
    part = train(f"{args} --max-steps 31", tmp_path, "part")
    assert (part / "checkpoints").is_dir()
    train(f"{args} --resume auto", tmp_path, "part")
    a = read_state(full / "checkpoints" / "step-00000066", "sparse_state")
    b = read_state(part / "checkpoints" / "step-00000066", "sparse_state")
    assert a["state"]["masks"].keys() == b["state"]["masks"].keys()
    for name in a["state"]["masks"]:
        assert torch.equal(a["state"]["masks"][name]["bits"], b["state"]["masks"][name]["bits"])
        assert torch.equal(a["state"]["fired"][name]["bits"], b["state"]["fired"][name]["bits"])
    from safetensors.torch import load_file
    wa = load_file(full / "checkpoints" / "step-00000066" / "model.safetensors")
    wb = load_file(part / "checkpoints" / "step-00000066" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_metrics(full)[-1]["final_itop_rate"] == read_metrics(part)[-1]["final_itop_rate"]


@pytest.mark.slow
def test_resume_refuses_another_sparse_setup(tmp_path):
    args = "--sparse --data digits --model digits-mlp --epochs 1 --batch-size 64 --density 0.1 --update_frequency 10"
    from test_checkpoints import refused

    run = train(args, tmp_path, "a")
    refused(f"{args.replace('0.1', '0.2')} --resume auto --device cpu", run, "sparsity.density: 0.1 -> 0.2")


def test_checkpoints_are_atomic_and_pruned(tmp_path, monkeypatch):
    import launcher.checkpoint as checkpoint
    from launcher.trainer import Trainer

    cfg = parse_config(shlex.split(
        f"--sparse --data digits --model digits-mlp --epochs 4 --batch-size 64 --keep-last 2 --update_frequency 10 "
        f"--output-dir {tmp_path / 'r'} --device cpu --no-progress --no-wandb --no-plots"))
    trainer = Trainer(cfg)
    trainer.fit()
    done = trainer.checkpointer.complete()
    best = trainer.checkpointer.best()
    assert [p.name for p in done][-2:] == ["step-00000066", "step-00000088"] and best in done
    assert len(done) == 2 + (best not in done[-2:])
    # A crash in the middle of the next save (after some of its files) leaves every complete
    # checkpoint as it was, and the half-written one is never taken.
    real_write, calls = checkpoint.write_state, []

    def crash(folder, name, state):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed while saving")
        return real_write(folder, name, state)

    monkeypatch.setattr(checkpoint, "write_state", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.checkpointer.save(99, {"step": 99}, is_best=True)
    assert trainer.checkpointer.complete() == done and trainer.checkpointer.best() == best
    assert (trainer.checkpointer.root / ".tmp-step-00000099").is_dir()
    assert trainer.checkpointer.resolve("auto") == done[-1]
    trainer.close()


@pytest.mark.slow
def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """2 micro-batches of 16 take the same optimizer steps as batches of 32 (same samples)."""
    from safetensors.torch import load_file

    args = ("--sparse --data digits --model digits-mlp --epochs 1 --density 0.2 --growth gradient "
            "--update_frequency 10 --lr-schedule constant --seed 3")
    big = train(f"{args} --batch-size 32", tmp_path, "big")
    acc = train(f"{args} --batch-size 16 --grad-accum-steps 2", tmp_path, "acc")
    ckpt = "checkpoints/step-00000044"
    wa, wb = load_file(big / ckpt / "model.safetensors"), load_file(acc / ckpt / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    ma = read_state(big / ckpt, "sparse_state")["state"]["masks"]
    mb = read_state(acc / ckpt, "sparse_state")["state"]["masks"]
    assert all(torch.equal(ma[n]["bits"], mb[n]["bits"]) for n in ma)
    assert read_metrics(acc)[-1]["step"] == 44


def test_bn_weight_decay_off_exempts_every_norm_layer():
    import models
    from launcher.trainer import _build_optimizer

    cfg = parse_config(["--model", "ResNet-18", "--data", "cifar10", "--bn-weight-decay", "false"])
    model = models.create_model("ResNet-18", "cifar10", num_classes=10)
    no_decay = {id(p) for g in _build_optimizer(model, cfg).param_groups if g["weight_decay"] == 0
                for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in no_decay}
    assert "layer2.0.shortcut.1.weight" in names  # a BN the reference's 'bn' name rule misses
    assert all(n.rsplit(".", 1)[0] in dict(model.named_modules()) and
               isinstance(dict(model.named_modules())[n.rsplit(".", 1)[0]], torch.nn.BatchNorm2d)
               for n in names)
    assert len(names) == sum(2 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    default = parse_config(["--model", "ResNet-18", "--data", "cifar10"])
    assert all(g["weight_decay"] == 5e-4 for g in _build_optimizer(model, default).param_groups)


@pytest.mark.slow
def test_stop_signal_checkpoints_then_resume_matches_uninterrupted(tmp_path):
    """SIGUSR1 (SLURM's warning) or SIGTERM: checkpoint at the next step, exit; resume is exact."""
    import signal
    import time

    args = ("--sparse --data digits --model digits-mlp --epochs 6 --batch-size 64 --density 0.1 "
            "--growth random --update_frequency 10 --log-interval 5 --no-wandb --no-plots")
    full = train(args, tmp_path, "full")
    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "launcher.train", *shlex.split(args), "--output-dir", str(out),
           "--no-progress", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and "train/loss" in metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    stopped = [r for r in read_metrics(out) if r.get("preempted")]
    assert len(stopped) == 1 and stopped[0]["step"] < 132, stdout[-1000:]
    assert not any(r.get("summary") for r in read_metrics(out))
    assert (out / "checkpoints" / f"step-{stopped[0]['step']:08d}").is_dir()
    train(f"{args} --resume auto", tmp_path, "stopped")
    a = read_state(full / "checkpoints" / "step-00000132", "sparse_state")
    b = read_state(out / "checkpoints" / "step-00000132", "sparse_state")
    assert all(torch.equal(a["state"]["masks"][n]["bits"], b["state"]["masks"][n]["bits"]) for n in a["state"]["masks"])
    assert read_metrics(full)[-1]["final_itop_rate"] == read_metrics(out)[-1]["final_itop_rate"]


GRADUAL = "--init-density {init} --final-density 0.02 --init-prune-epoch 0 --final-prune-epoch 2"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["DST", "static", "GraNet", "GraNet_uniform", "GMP", "GMP_uniform"])
def test_best_is_chosen_at_the_target_density_only(tmp_path, method):
    """Pruned to 2% by epoch 2 of 3, the model is less accurate than it was while denser: the
    best must still be one of the evaluations at 2% (and best.json must point to it)."""
    gradual = method.startswith(("GraNet", "GMP"))
    density = GRADUAL.format(init=1 if method.startswith("GMP") else 0.5) if gradual else "--density 0.02"
    out = train(f"--sparse --method {method} {density} --data digits --model digits-mlp --epochs 3 "
                f"--batch-size 64 --lr 0.05 --update_frequency 5 --eval-every 5 --no-wandb --no-plots",
                tmp_path, method)
    records = read_metrics(out)
    summary = records[-1]
    evals = [r for r in records if "val/acc" in r]
    at_target = [r for r in evals if abs(r["sparsity/density"] - 0.02) < 1e-3]
    assert at_target and summary["final_density"] == pytest.approx(0.02, abs=1e-3)
    best = max(at_target, key=lambda r: r["val/acc"])
    assert (summary["best_val_acc"], summary["best_step"]) == (best["val/acc"], best["step"])
    assert summary["best_density"] == best["sparsity/density"]
    assert json.loads((out / "checkpoints" / "best.json").read_text())["name"] == f"step-{best['step']:08d}"
    denser = [r for r in evals if r["sparsity/density"] > 0.021]
    if gradual:  # the case this guards: a denser model beat every model at the target
        assert denser and max(r["val/acc"] for r in denser) > best["val/acc"]
    else:
        assert not denser and at_target == evals


README_DIGITS = ("--sparse --density 0.05 --update_frequency 50 --data digits --model digits-mlp "
                 "--epochs 100 --batch-size 64 --lr 0.05")


@pytest.mark.slow
def test_every_readme_command_and_recipe_gets_its_own_default_folder():
    """SET, RigL, momentum, static: one folder each (they shared one before); the 24 recipes
    map to 24 folders (a timm model's in one folder of runs/, not in runs/timm/); and a setting of the identity (here the LR or the multiplier) moves it."""
    commands = [f"{README_DIGITS} --growth {g}" for g in ("random", "gradient", "momentum")]
    commands += [f"{README_DIGITS} --fix", f"{README_DIGITS} --growth random --lr 0.5",
                 f"{README_DIGITS} --growth random --multiplier 2"]
    folders = [parse_config(shlex.split(c)).run_dir for c in commands]
    assert len(set(folders)) == len(commands), folders
    assert folders[0].name.startswith("digits-mlp-digits-random-d0.05-s17-")
    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert len(recipes) == 24
    run_dirs = {parse_config(["--config", str(r)]).run_dir for r in recipes}
    assert len(run_dirs) == 24 and {d.parent for d in run_dirs} == {pathlib.Path("runs")}
    # What may change on resume does not move the folder.
    same = parse_config(shlex.split(f"{commands[0]} --epochs 200 --log-interval 5 --keep-last 9 --batch-size 32"))
    assert same.run_dir == folders[0]


def test_sparse_flags_without_sparse_are_refused_and_dense_is_explicit():
    with pytest.raises(ConfigError, match=r"^--density, --growth given without --sparse would train "
                                          r"the dense model; add --sparse .* or --dense"):
        parse_config(["--density", "0.1", "--growth", "gradient"])
    assert not parse_config(["--dense", "--density", "0.1"]).sparse
    assert parse_config(["--sparse", "--density", "0.1"]).sparsity.density == 0.1


@pytest.mark.slow
def test_the_launchers_precision_stands_and_impossible_devices_are_refused(tmp_path, monkeypatch):
    from launcher.trainer import _resolve_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    assert _resolve_precision(parse_config([])) == "bf16"
    assert _resolve_precision(parse_config(["--mixed-precision", "no"])) == "no"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    assert _resolve_precision(parse_config([])) == "no"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device: cuda: no GPU is visible here"):
            parse_config(["--device", "cuda"])
        from launcher.train import main

        assert main(["--mixed-precision", "fp16", "--device", "cpu", "--output-dir", str(tmp_path / "r")]) == 2
        assert not (tmp_path / "r").exists()


BAD_FILES = {
    "section as a scalar": ("c.yaml", "sparsity: 0.05\n", "c.yaml: sparsity must be a section (a mapping of keys), got float 0.05"),
    "top-level list": ("c.yaml", "- sparse\n", "c.yaml: the top level must be a mapping of sections"),
    "null section": ("c.yaml", "optim: null\n", "c.yaml: optim must be a section (a mapping of keys), got null"),
    "wrong element type": ("c.yaml", "sparse: true\nsparsity:\n  exclude: 5\n",
                           "c.yaml: sparsity.exclude[0] must be a string, got int 5"),
    "bool for an int (TOML)": ("c.toml", "[data]\nbatch_size = true\n",
                               "c.toml: data.batch_size must be an integer, got bool True"),
    "milestones as strings": ("c.yaml", "schedule:\n  milestones: ['0.5', '0.75']\n",
                              "c.yaml: schedule.milestones[0] must be a number, got str '0.5'"),
    "mask seed beside the run's seed": ("c.yaml", "sparse: true\nsparsity:\n  seed: 5\n",
                                        "c.yaml: sparsity.seed 5 differs from seed 17"),
    "binary file": ("c.yaml", b"\x7fELF\x02\x01\x01\x00\xff\xfe", "c.yaml is not a text file (not UTF-8)"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_a_bad_config_file_names_the_file_the_key_and_the_type(tmp_path, kind):
    name, text, expected = BAD_FILES[kind]
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        parse_config(["--config", str(path)])
    assert str(path.parent) in str(err.value) and expected in str(err.value)
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("flag,value,expected", [
    ("--epochs", "inf", "--epochs: must be a finite number, got inf"),
    ("--lr", "nan", "--lr: must be a finite number, got nan"),
])
def test_non_finite_flags_are_refused(flag, value, expected):
    with pytest.raises(ConfigError, match=f"^{expected}$"):
        parse_config([flag, value])


DIGITS = "--sparse --data digits --model digits-mlp --batch-size 64 --no-wandb --no-plots --device cpu"
IMPOSSIBLE = {
    "GMP window without an update": (
        "--method GMP --init-density 1 --final-density 0.1 --final-prune-epoch 2 --update_frequency 500 --epochs 3",
        "the pruning window [--init-prune-epoch 0, --final-prune-epoch 2] (44 steps) holds no mask update "
        "with --update_frequency 500 before step 66: use --update_frequency <= 44"),
    "GraNet window ending after the run": (
        "--method GraNet --init-density 0.5 --final-density 0.05 --final-prune-epoch 50 --update_frequency 50 --epochs 10",
        "would end at density 0.2965, not --final-density 0.05: use --final-prune-epoch <= 9.09"),
    "warm-up longer than the run": ("--warmup 5 --epochs 3 --update_frequency 10",
                                    "--warmup 5: the warm-up is not shorter than the run (3 epochs); use --warmup <= 2"),
    "no mask update before update_stop": (
        "--epochs 2 --update_frequency 30 --update_stop 0.5",
        "no mask update happens before the updates stop at step 22 (--update_stop 0.5 of 44 steps): use "
        "--update_frequency <= 22 or a later --update_stop"),
    "a density that leaves layers empty": ("--density 1e-5 --epochs 1 --update_frequency 10",
                                           "--density 1e-05 leaves 3 layer(s) without any weight (fc1.weight first"),
    "FSDP on one process": ("--sharding fsdp --epochs 1 --update_frequency 10",
                            "--sharding zero3 needs at least 2 processes (this is 1)"),
    "momentum growth without momentum": ("--growth momentum --momentum 0 --epochs 1 --update_frequency 10",
                                         "--growth: momentum growth regrows by the optimizer's momentum, and "
                                         "--momentum 0 keeps none"),
    "an hsdp shard group of 0": ("--sharding hsdp --shard-group-size 0 --epochs 1 --update_frequency 10",
                                 "--shard-group-size: 0 must be >= 1 (processes per shard group)"),
    "a shard group without hsdp": ("--sharding zero3 --shard-group-size 2 --epochs 1 --update_frequency 10",
                                   "--shard-group-size: 2 needs --sharding hsdp"),
}


@pytest.mark.parametrize("kind", sorted(IMPOSSIBLE))
def test_settings_that_cannot_do_what_they_say_are_refused_at_start(tmp_path, capsys, kind):
    from launcher.train import main

    args, expected = IMPOSSIBLE[kind]
    assert main(shlex.split(f"{DIGITS} {args} --output-dir {tmp_path / 'run'}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_diverged_run_stops_in_one_line_and_saves_nothing_from_it(tmp_path, capsys):
    from launcher.train import main

    out = tmp_path / "run"
    assert main(shlex.split(f"{DIGITS} --epochs 3 --update_frequency 10 --lr 1e6 --output-dir {out}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["itop-train: error: the evaluation loss is nan at step 22 (epoch 1): the run diverged; "
                   "lower --lr (now 1e+06) or add --warmup, and resume from the start (no checkpoint yet)"]
    assert not (out / "checkpoints").exists()
