"""What a researcher reads: the header, the log lines (with and without a terminal), the
rounded ITOP line, honest split names, the W&B run summary and config, the sync hint, plots."""

import fcntl
import json
import os
import pathlib
import pty
import re
import shlex
import struct
import subprocess
import sys
import termios
import threading
import tty
import types

import pytest

import models
from data_pipelines import DataConfig, build_loaders
from itop_dist import SparseConfig, Sparsifier
from itop_dist.sparsifier import UpdateReport, maskable_parameters
from launcher import plots
from launcher.tracking import Tracker, method_line

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
TINY = "--data digits --model digits-mlp --batch-size 64 --device cpu"
RIGL = (f"--sparse {TINY} --density 0.05 --growth gradient --update_frequency 10 --epochs 1 "
        "--log-interval 5 --wandb-mode offline")
GMP = (f"--sparse {TINY} --method GMP --density 1.0 --final-density 0.1 --init-prune-epoch 0 "
       "--final-prune-epoch 1 --update_frequency 4 --epochs 2 --valid-split 0.1 --log-interval 7 "
       "--no-wandb --no-progress")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["WANDB_API_KEY"] = ""
    return env


def train(args: str, out: pathlib.Path, tty_stderr: bool = False) -> tuple[str, str]:
    """Run the entry point; stdout and stderr piped, or stderr on a pseudo-terminal (the bar's
    stream). Returns (stdout, stderr) as written, carriage returns included."""
    cmd = [sys.executable, "-m", "launcher.train", *shlex.split(args), "--output-dir", str(out)]
    if not tty_stderr:
        proc = subprocess.run(cmd, capture_output=True, cwd=REPO, env=_env(), timeout=600)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        return proc.stdout.decode(), proc.stderr.decode()
    master, slave = pty.openpty()
    tty.setraw(slave)  # no newline translation: a carriage return seen is one tqdm wrote
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    chunks: list[bytes] = []

    def drain() -> None:  # keep reading, or a full terminal buffer would block the run
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the other end closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, cwd=REPO, env=_env())
    os.close(slave)
    stdout, _ = proc.communicate(timeout=600)
    reader.join(timeout=30)
    os.close(master)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return stdout.decode(), b"".join(chunks).decode(errors="replace")


def counts(valid_split=None) -> dict:
    """The header's numbers, from the model and the data themselves."""
    model = models.create_model("digits-mlp", "digits", num_classes=10)
    loaders = build_loaders(DataConfig(name="digits", batch_size=64, valid_split=valid_split),
                            seed=17, rank=0, world_size=1)
    masked = maskable_parameters(model)
    return {"total": sum(p.numel() for p in model.parameters()),
            "masked": sum(p.numel() for p in masked.values()),
            "steps": len(loaders.train), "model": model}


def read_metrics(run: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def wandb_records(run: pathlib.Path) -> list[dict]:
    path = next((run / "wandb").glob("offline-run-*"))
    out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def rigl_run(tmp_path_factory):
    """RigL on digits (no validation split), 1 epoch, W&B offline, output piped (no terminal)."""
    out = tmp_path_factory.mktemp("console") / "rigl"
    stdout, stderr = train(RIGL, out)
    return out, stdout, stderr


@pytest.mark.slow
def test_header_names_run_device_precision_counts_steps_method(rigl_run):
    out, stdout, _ = rigl_run
    c = counts()
    model = c["model"]
    sp = Sparsifier(model, None, SparseConfig(density=0.05, growth="gradient", update_frequency=10, seed=17),
                    total_steps=c["steps"])
    nonzero = sum(int(m.sum()) for m in sp.masks.values())
    assert nonzero == round(0.05 * c["masked"])  # ERK exact counts
    lines = stdout.splitlines()
    assert lines[:6] == [
        f"run: {out}",
        "device: cpu, world size 1 (NO), precision no, sharding ddp",
        f"model: digits-mlp, {c['total']:,} parameters, {c['masked']:,} masked, {nonzero:,} non-zero "
        "masked at density 0.05",
        f"steps: {c['steps']} per epoch, {c['steps']} in all (1 epoch, global batch 64)",
        "method: RigL-ITOP: DST, ERK init, density 0.05, magnitude death, gradient growth, update every 10 steps",
        "no validation split: the best model is selected on the test set",
    ]
    assert (c["total"], c["masked"], nonzero) == (85002, 84480, 4224)
    # The same values in the W&B config's run section.
    runs = [r["config"]["update"]["run"] for r in wandb_records(out)
            if r.get("type") == "config" and "run" in r["config"]["update"]]
    assert len(runs) == 1
    assert {k: runs[0][k] for k in ("params_total", "params_masked", "params_nonzero_at_target", "world_size",
                                    "precision", "steps_per_epoch", "total_steps", "method")} == {
        "params_total": 85002, "params_masked": 84480, "params_nonzero_at_target": 4224, "world_size": 1,
        "precision": "no", "steps_per_epoch": 22, "total_steps": 22,
        "method": "RigL-ITOP: DST, ERK init, density 0.05, magnitude death, gradient growth, update every 10 steps"}


@pytest.mark.slow
def test_log_lines_every_interval_and_no_carriage_returns_when_piped(rigl_run):
    out, stdout, stderr = rigl_run
    assert "\r" not in stdout and "\r" not in stderr  # the bar turned itself off: no terminal
    logged = [int(m) for m in re.findall(r"^step (\d+)/22 epoch 0: loss \d+\.\d{4} lr \S+ images/s \d+ "
                                         r"density 0\.0500 itop 0\.\d{4} eta \d+:\d\d:\d\d$", stdout, re.M)]
    assert logged == [5, 10, 15, 20, 22]
    train = {r["step"]: r for r in read_metrics(out) if "train/loss" in r}
    for step in logged:
        assert f"step {step}/22 epoch 0: loss {train[step]['train/loss']:.4f} " in stdout


@pytest.mark.slow
def test_itop_line_rounded_and_eval_line_names_only_test(rigl_run):
    out, stdout, _ = rigl_run
    updates = {r["step"]: r["itop/rate"] for r in read_metrics(out) if "mask/pruned" in r}
    fired = re.findall(r"^step (\d+): .*The percentage of the total fired weights is (\S+)$", stdout, re.M)
    assert [int(s) for s, _ in fired] == [10, 20]
    for step, shown in fired:
        assert shown == f"{updates[int(step)]:.4f}" and len(shown) == 6
    evals = [ln for ln in stdout.splitlines() if re.match(r"step \d+ epoch \d+: ", ln)]
    summary = read_metrics(out)[-1]
    assert evals == [f"step 22 epoch 1: test acc {summary['final_test_acc']:.4f} sparsity/density 0.0500 "
                     f"itop/rate {summary['final_itop_rate']:.4f} flops/train_rel "
                     f"{summary['train_flops_rel']:.4f} flops/test_rel 0.0500"]
    assert "val acc" not in stdout


@pytest.mark.slow
def test_summary_is_the_wandb_run_summary_not_history(rigl_run):
    out, stdout, _ = rigl_run
    summary = read_metrics(out)[-1]
    assert summary["summary"] is True and summary["world_size"] == 1  # metrics.jsonl as before
    records = wandb_records(out)
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    assert not any("final_test_acc" in h or "ranks_identical" in h for h in history)
    ours = [r["summary"]["update"] for r in records
            if r.get("type") == "summary" and "final_test_acc" in r["summary"]["update"]]
    assert len(ours) == 1
    expected = {k: v for k, v in summary.items() if k != "summary" and v is not None}
    assert ours[0] == expected
    assert ours[0]["ranks_identical"] is True and ours[0]["world_size"] == 1
    # The end-of-run hint: every segment, the exact command.
    segment = next((out / "wandb").glob("offline-run-*")).name
    assert f"1 segment(s) under {out.resolve()}/wandb ({segment})" in stdout
    assert f"  wandb sync {out.resolve()}/wandb/offline-run-*" in stdout


@pytest.mark.slow
def test_plots_carry_run_and_method(rigl_run):
    out, _, _ = rigl_run
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["acc_vs_flops.png", "itop_rate.png", "layer_density.png", "loss_lr.png"]  # no density.png
    assert plots.run_title(out) == (
        "rigl - RigL-ITOP: DST, ERK init, density 0.05, magnitude death, gradient growth, update every 10 steps")


@pytest.mark.slow
def test_gmp_with_validation_split_no_progress_on_a_terminal(tmp_path):
    """--no-progress with a terminal: no bar, the log lines still; a validation split names
    both accuracies; a dense-to-sparse run gets density.png."""
    out = tmp_path / "gmp"
    stdout, terminal = train(GMP, out, tty_stderr=True)
    assert "\r" not in terminal and "\r" not in stdout
    c = counts(valid_split=0.1)
    lines = stdout.splitlines()
    assert lines[2] == (f"model: digits-mlp, {c['total']:,} parameters, {c['masked']:,} masked, "
                        f"{round(0.1 * c['masked']):,} non-zero masked at density 0.1")
    assert lines[3] == f"steps: {c['steps']} per epoch, {2 * c['steps']} in all (2 epochs, global batch 64)"
    assert lines[4] == ("method: GMP: global, dense start, density 1 -> 0.1 (epochs 0-1), magnitude pruning, "
                        "no regrowth, update every 4 steps")
    assert "no validation split" not in stdout
    total = 2 * c["steps"]
    logged = [int(s) for s in re.findall(rf"^step (\d+)/{total} epoch \d+: loss ", stdout, re.M)]
    assert logged == sorted({*range(7, total + 1, 7), total})
    evals = re.findall(r"^step \d+ epoch \d+: val acc \d\.\d{4} test acc \d\.\d{4} ", stdout, re.M)
    assert len(evals) == 2
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["acc_vs_flops.png", "density.png", "itop_rate.png", "layer_density.png", "loss_lr.png"]
    from PIL import Image

    for name in names:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 200


@pytest.mark.slow
def test_progress_bar_on_a_terminal_beside_the_log_lines(tmp_path):
    stdout, terminal = train(f"{TINY} --epochs 1 --max-steps 4 --log-interval 2 --no-wandb --no-plots",
                             tmp_path / "dense", tty_stderr=True)
    assert "\r" in terminal and "4/4" in terminal  # tqdm's bar, on the terminal only
    assert "\r" not in stdout
    assert re.findall(r"^step (\d+)/4 epoch 0: loss \S+ lr \S+ images/s \d+ density 1\.0000 eta", stdout, re.M) == ["2", "4"]
    assert "method: dense: no masks" in stdout


def test_update_report_rounds_the_itop_rate():
    report = UpdateReport(50, 0.49943, 2110, 2110, 0.05, 0.07282196969696969, {})
    assert str(report) == ("step 50: pruned 2110, regrew 2110 (rate 0.4994), density 0.0500. "
                           "The percentage of the total fired weights is 0.0728")


def test_method_lines():
    def cfg(**sparsity):
        return {"sparse": True, "sparsity": {**SparseConfig(**sparsity).to_dict()}}

    assert method_line(cfg(density=0.05, growth="random", update_frequency=1500)) == (
        "SET-ITOP: DST, ERK init, density 0.05, magnitude death, random growth, update every 1500 steps")
    assert method_line(cfg(method="GraNet", density=0.5, final_density=0.05, final_prune_epoch=150,
                           update_frequency=1000)) == (
        "GraNet: global, ERK init, density 0.5 -> 0.05 (epochs 0-150), magnitude death, gradient growth, "
        "update every 1000 steps")
    assert method_line(cfg(method="static", update_frequency=None)) == (
        "static sparse: ERK init, density 0.05, masks fixed")
    assert method_line({"sparse": False}) == "dense: no masks"


def test_sync_hint_names_every_segment_of_a_resumed_run(tmp_path, capsys):
    segments = ["offline-run-20260101_000000-abc", "offline-run-20260102_000000-abc"]
    for name in segments:
        (tmp_path / "wandb" / name).mkdir(parents=True)
    acc = types.SimpleNamespace(is_main_process=True, end_training=lambda: None)
    tracker = Tracker(acc, tmp_path, True, "p", "offline")
    tracker.run_id = "abc"
    tracker.finish()
    folder = (tmp_path / "wandb").resolve()
    assert capsys.readouterr().out == (
        f"W&B offline run abc: 2 segment(s) under {folder} ({', '.join(segments)}); upload them all with:\n"
        f"  wandb sync {folder}/offline-run-*\n")
    tracker.finish()  # once only
    assert capsys.readouterr().out == ""


def test_plot_titles_from_config_and_density_only_when_it_changes(tmp_path):
    (tmp_path / "config.yaml").write_text("sparse: false\n")
    rows = [{"step": s, "epoch": 0, "train/loss": 2.0 / s, "train/lr": 0.1, "sparsity/density": 1.0}
            for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plots.write_plots(tmp_path / "metrics.jsonl", tmp_path)
    assert [p.name for p in written] == ["loss_lr.png"]
    assert plots.run_title(tmp_path) == f"{tmp_path.name} - dense: no masks"
