"""Sup-tickets: phases, the cyclic LR, superposition (CAA, CIMA), the final-density cut, BN
recalibration, and exact resume inside the cyclic phase."""

import json

import pytest
import torch
from safetensors.torch import load_file

import models
from data_pipelines import DataConfig, build_loaders
from itop_dist.suptickets import Superposition, cut_to_density, cyclic_lr, phases, superpose
from test_train import read_metrics, train

# GraNet pre-training for 12 epochs (pruning 0.5 -> 0.05 by epoch 6), then 2 cycles of 2
# epochs: 2 tickets, 2 superposed models.
ARGS = ("--sparse --method GraNet --data digits --model digits-mlp-bn --init-density 0.5 "
        "--final-density 0.05 --final-prune-epoch 6 --growth gradient --epochs 16 --batch-size 64 "
        "--lr 0.05 --update_frequency 20 --pre_train --cyclic_train --cycle 2 --cycle_rate 0.25 "
        "--cyc_lr --lr_1 0.01 --lr_2 0.05 --re_explore --large-death-rate 0.5 --no_maskupdates "
        "--update_bn --no-wandb")


def test_phase_split_matches_the_spec():
    assert phases(250, 8, 0.1) == (226, 24)  # the README's CIFAR runs: 3 tickets
    assert phases(100, 2, 0.0, cyclic_epochs=8) == (92, 8)  # ImageNet: --cyclic_epochs 8
    assert phases(20, 8, 0.1) == (20, 0)  # fewer cyclic epochs than a cycle: no cyclic phase


def test_cyclic_lr_is_a_low_high_low_triangle():
    assert cyclic_lr(0.0, 0.001, 0.005) == pytest.approx(0.001)
    assert cyclic_lr(0.25, 0.001, 0.005) == pytest.approx(0.003)
    assert cyclic_lr(0.5, 0.001, 0.005) == pytest.approx(0.005)
    assert cyclic_lr(0.75, 0.001, 0.005) == pytest.approx(0.003)


def test_superposition_and_cut():
    s0 = {"w": torch.tensor([1.0, 0.0, 3.0, 0.0]), "n": torch.tensor(5)}
    t1 = {"w": torch.tensor([3.0, 2.0, 0.0, 0.0]), "n": torch.tensor(9)}
    mixed = superpose(s0, t1, 0.25)  # 0.75 previous + 0.25 ticket
    assert torch.equal(mixed["w"], torch.tensor([1.5, 0.5, 2.25, 0.0])) and int(mixed["n"]) == 9
    cut = cut_to_density(mixed, ["w"], 0.5)
    assert torch.equal(cut["w"], torch.tensor([1.5, 0.0, 2.25, 0.0]))


S0 = {"w": torch.tensor([1.0, 0.0, 3.0, 4.0]), "b": torch.tensor([1.0]), "n": torch.tensor(5)}
TICKETS = [{"w": torch.tensor([3.0, 2.0, 0.0, 8.0]), "b": torch.tensor([4.0]), "n": torch.tensor(9)},
           {"w": torch.tensor([6.0, 3.0, 3.0, 0.0]), "b": torch.tensor([7.0]), "n": torch.tensor(11)}]


@pytest.mark.parametrize("method,factor,density,expected", [
    # CAA: S_j is the running mean of S_0, T_1 .. T_j (factor 1/(j+1)): (S0 + T1 + T2) / 3
    ("CAA", 0.3, 1.0, [[2.0, 1.0, 1.5, 6.0], [10 / 3, 5 / 3, 2.0, 4.0]]),
    # CIMA: S_j = (1 - f) S_{j-1} + f T_j with f = 0.3 (asymmetric: a swapped argument fails)
    ("CIMA", 0.3, 1.0, [[1.6, 0.6, 2.1, 5.2], [2.92, 1.32, 2.37, 3.64]]),
    # and cut to density 0.5 after each superposition: the 2 largest |w| of 4 stay
    ("CIMA", 0.3, 0.5, [[0.0, 0.0, 2.1, 5.2], [0.0, 0.0, 2.37, 3.64]]),
])
def test_supertickets_superpose_with_the_papers_weights(tmp_path, method, factor, density, expected):
    tickets = Superposition(method, factor, density, ["w"])
    tickets.start(S0)
    for ticket, want in zip(TICKETS, expected):
        got = tickets.add(ticket)
        assert torch.allclose(got["w"], torch.tensor(want), atol=1e-6), (method, got["w"])
        assert int(got["n"]) == int(ticket["n"])  # counters from the newest ticket
    # b is unmasked: superposed, never cut
    f1, f2 = (0.5, 1 / 3) if method == "CAA" else (factor, factor)
    b1 = (1 - f1) * 1.0 + f1 * 4.0
    assert float(got["b"]) == pytest.approx((1 - f2) * b1 + f2 * 7.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sup")
    return {m: train(f"{ARGS} --superposing_method {m}", root, m) for m in ("CAA", "CIMA")}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["CAA", "CIMA"])
def test_two_cycles_give_two_superposed_models_at_the_final_density(runs, method):
    run = runs[method]
    records = read_metrics(run)
    supers = [r for r in records if "supertickets/acc" in r]
    assert [r["supertickets/ticket"] for r in supers] == [1, 2]
    assert all(r["supertickets/density"] == pytest.approx(0.05, abs=1e-4) for r in supers)
    summary = records[-1]
    assert summary["result"] == "superposed model 2 (Sup-tickets)"
    assert summary["superposed_test_acc"] == supers[-1]["supertickets/acc"] >= 0.9
    assert "last_ticket_test_acc" in summary
    files = sorted(p.name for p in (run / "supertickets").iterdir())
    assert files == ["superposed-1.safetensors", "superposed-2.safetensors"]
    updates = [r for r in records if "mask/pruned" in r and r["step"] >= 12 * 22]
    assert [r["step"] for r in updates] == [264, 308]  # only the re-explore starting each cycle


@pytest.mark.slow
def test_caa_and_cima_differ(runs):
    a = load_file(runs["CAA"] / "supertickets" / "superposed-2.safetensors")
    b = load_file(runs["CIMA"] / "supertickets" / "superposed-2.safetensors")
    assert not torch.equal(a["fc1.weight"], b["fc1.weight"])


@pytest.mark.slow
def test_batch_norm_statistics_are_recalibrated_on_the_training_data(runs):
    state = load_file(runs["CAA"] / "supertickets" / "superposed-2.safetensors")
    model = models.create_model("digits-mlp-bn", "digits", num_classes=10)
    model.load_state_dict(state)
    loaders = build_loaders(DataConfig(name="digits", batch_size=64), seed=17)
    loaders.train.set_epoch(16)  # the pass after the last epoch, as the trainer ran it
    with torch.no_grad():
        pre = torch.cat([model.fc1(x.flatten(1)) for x, _ in loaders.train])
    # The cumulative average over the batches of one pass: per-batch means averaged.
    assert torch.allclose(state["bn1.running_mean"], pre.mean(0), atol=1e-4)
    assert int(state["bn1.num_batches_tracked"]) == len(loaders.train)


@pytest.mark.slow
def test_resume_in_the_cyclic_phase_matches_uninterrupted(runs, tmp_path):
    part = train(f"{ARGS} --superposing_method CAA --max-steps 310", tmp_path, "part")  # in cycle 1
    assert json.loads((part / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 310
    train(f"{ARGS} --superposing_method CAA --resume auto", tmp_path, "part")
    for i in (1, 2):
        a = load_file(runs["CAA"] / "supertickets" / f"superposed-{i}.safetensors")
        b = load_file(part / "supertickets" / f"superposed-{i}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), i
    assert read_metrics(part)[-1]["superposed_test_acc"] == read_metrics(runs["CAA"])[-1]["superposed_test_acc"]


def seed_command(config: str) -> list[str]:
    """The seed README command quoted at the top of a recipe file, minus the script name."""
    import pathlib
    import shlex

    text = (pathlib.Path(__file__).resolve().parents[1] / "configs" / config).read_text()
    line = next(l for l in text.splitlines() if l.startswith(("# Seed README", "# GraNet README")))
    return shlex.split(line.split(".py ", 1)[1])


RECIPES = ["cifar100_resnet50_suptickets_granet.yaml", "cifar100_resnet50_suptickets_rigl.yaml",
           "cifar100_resnet50_suptickets_set.yaml", "cifar10_resnet50_granet_si0.5_d0.1.yaml",
           "cifar10_resnet50_granet_dense_d0.1.yaml", "cifar10_resnet50_granet_si0.5_d0.05.yaml",
           "cifar10_resnet50_gmp_d0.1.yaml", "cifar10_resnet50_rigl_itop_dst_d0.1.yaml"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_files_say_what_the_seed_commands_say(recipe):
    import pathlib

    from launcher.config import parse_config

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / recipe
    from_cli, from_file = parse_config(seed_command(recipe)), parse_config(["--config", str(path)])
    for part in ("model", "data", "sparsity", "optim", "tickets"):
        assert getattr(from_cli, part) == getattr(from_file, part), part
    assert from_cli.schedule.epochs == from_file.schedule.epochs and from_cli.seed == from_file.seed


@pytest.mark.slow
def test_suptickets_seed_command_runs_on_a_tiny_on_disk_cifar100(fake_cifar100_large, tmp_path):
    from launcher.config import parse_config
    from launcher.trainer import Trainer

    cfg = parse_config(seed_command("cifar100_resnet50_suptickets_granet.yaml") + [
        "--data-dir", str(fake_cifar100_large.root), "--max-steps", "1", "--output-dir",
        str(tmp_path / "run"), "--device", "cpu", "--no-progress", "--no-wandb", "--no-plots",
        # 1-step epochs: the recipe's 1000-step frequency holds no update in the pruning window
        "--update_frequency", "10"])
    trainer = Trainer(cfg)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    [tickets] = trainer.plugins
    assert summary["step"] == 1 and tickets.pretrain_epochs == 226 and tickets.superposition is not None


@pytest.mark.parametrize("recipe", ["imagenet_resnet50_suptickets_granet.yaml",
                                    "imagenet_resnet50_suptickets_rigl.yaml"])
def test_imagenet_seed_commands_run_as_written(recipe):
    """The ImageNet Sup-tickets commands, our launcher in place of multiproc.py/main.py."""
    import pathlib
    import shlex

    from launcher.config import parse_config

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / recipe
    line = next(l for l in path.read_text().splitlines() if "-m launcher.train " in l and "--sparse" in l)
    from_cli = parse_config(shlex.split(line.split("-m launcher.train ", 1)[1]))
    from_file = parse_config(["--config", str(path)])
    assert from_cli.data.data_dir == "IMAGENET" and from_cli.data.name == "imagenet"
    # channels_last: the file says true, the command leaves the default (on for conv nets on GPUs)
    assert (from_cli.model.name, from_cli.model.init) == (from_file.model.name, from_file.model.init)
    for part in ("sparsity", "optim", "tickets", "schedule"):
        assert getattr(from_cli, part) == getattr(from_file, part), part
    assert from_cli.schedule.milestone_epochs == (30, 60, 85)
    assert from_cli.sparsity.final_density == 0.1 and from_cli.tickets.pretrain_epochs == 92
