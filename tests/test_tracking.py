"""What a run shows: W&B offline runs read back, the same numbers in metrics.jsonl, plots,
a resumed run continuing its W&B run, and the report built offline."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
ARGS = ("--sparse --data digits --model digits-mlp --density 0.05 --epochs 4 --batch-size 64 "
        "--lr 0.05 --growth gradient --update_frequency 20 --device cpu --no-progress")


def run(args: str, out: pathlib.Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["WANDB_API_KEY"] = ""  # not logged in: the trainer must choose offline by itself
    proc = subprocess.run([sys.executable, "-m", "launcher.train", *shlex.split(args),
                           "--output-dir", str(out)], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def wandb_records(run_dir: pathlib.Path) -> list[dict]:
    """Every record of the run's .wandb log, read with W&B's own reader."""
    path = next((run_dir / "wandb").glob("offline-run-*"))
    out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("runs") / "quick"
    run(ARGS, out)
    return out


@pytest.mark.slow
def test_offline_wandb_run_holds_itop_rate_flops_and_layer_densities(quick_run):
    history = [r["history"]["item"] for r in wandb_records(quick_run) if r.get("type") == "history"]
    keys = set().union(*history)
    for key in ("train/loss", "train/lr", "val/acc", "sparsity/density", "itop/rate",
                "flops/train_cumulative", "flops/train_rel", "flops/test_rel", "perf/images_per_s",
                "mask/pruned", "mask/regrown", "density/fc1.weight", "density/fc3.weight"):
        assert key in keys, key
    rates = [h["itop/rate"] for h in history if "itop/rate" in h]
    assert rates == sorted(rates) and rates[-1] > 0.05
    # metrics.jsonl holds the same numbers
    local = [json.loads(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in local if "val/acc" in r][-1]
    wandb_eval = [h for h in history if "val/acc" in h][-1]
    assert wandb_eval["val/acc"] == last_eval["val/acc"]
    assert wandb_eval["flops/train_cumulative"] == last_eval["flops/train_cumulative"]


@pytest.mark.slow
def test_flops_in_metrics_follow_density(quick_run):
    local = [json.loads(line) for line in (quick_run / "metrics.jsonl").read_text().splitlines()]
    summary = local[-1]
    assert summary["summary"] and 0.04 < summary["test_flops_rel"] < 0.2
    # RigL pays a dense gradient on update steps: training FLOPs a little above test FLOPs.
    assert summary["test_flops_rel"] < summary["train_flops_rel"] < 3 * summary["test_flops_rel"]
    totals = [r["flops/train_cumulative"] for r in local if "flops/train_cumulative" in r]
    assert totals == sorted(totals) and totals[-1] == summary["train_flops"]


@pytest.mark.slow
def test_plots_are_valid_pngs(quick_run):
    for name in ("itop_rate.png", "acc_vs_flops.png", "layer_density.png"):
        with Image.open(quick_run / name) as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200
            low, high = img.convert("L").getextrema()
            assert high - low > 100  # not a blank image


@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(tmp_path):
    out = tmp_path / "r"
    run(f"{ARGS} --max-steps 30", out)
    run(f"{ARGS} --resume auto", out)
    ids = {p.name.rsplit("-", 1)[1] for p in (out / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, ids
    steps = [r["history"]["item"]["_step"] for p in (out / "wandb").glob("offline-run-*")
             for r in wandb_records_of(p) if r.get("type") == "history"]
    assert max(steps) == 88


def wandb_records_of(path: pathlib.Path) -> list[dict]:
    out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(path)],
                         capture_output=True, text=True, timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_no_wandb_writes_metrics_only(tmp_path):
    out = tmp_path / "n"
    run(f"{ARGS} --max-steps 5 --no-wandb --no-plots", out)
    assert not (out / "wandb").exists() and (out / "metrics.jsonl").is_file()
    assert not (out / "itop_rate.png").exists()


@pytest.mark.slow
def test_report_dry_run_builds_offline(quick_run):
    out = subprocess.run([str(BIN / "itop-report"), "--dry-run", "--project", "itop_dist",
                          "--layers-from", str(quick_run)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for panel in ("ScatterPlot 'Accuracy vs density'", "LinePlot 'ITOP rate", "'Accuracy vs training FLOPs'",
                  "'density/fc2.weight'"):
        assert panel in out.stdout
