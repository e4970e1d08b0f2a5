"""Checkpoints you can trust: loading runs no code, damage is found and named, nothing in a run
folder is lost or mixed, another setup resumes or is refused in one line.

Every refusal here goes through :func:`refused`, which also proves that the run folder is
byte-for-byte what it was before (hash of every file's path, size and content).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from launcher.checkpoint import (CheckpointError, Checkpointer, RNGState, RunLock, join_state,
                                 read_state, sha256, split_state, verify)
from launcher.train import main

REPO = pathlib.Path(__file__).resolve().parents[1]
# 22 steps per epoch (1 process x 64); a checkpoint every 11 steps: 11, 22, 33, 44.
BASE = ("--sparse --data digits --model digits-mlp --batch-size 64 --density 0.1 --growth gradient "
        "--update_frequency 10 --seed 5 --no-wandb --no-plots --no-progress --device cpu")
RUN = f"{BASE} --epochs 2 --save-every 11 --keep-last 5"


def cli(args: str, out: pathlib.Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launcher.train", *shlex.split(args), "--output-dir", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def folder_hash(folder: pathlib.Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def refused(args: str, out: pathlib.Path, *expected: str, folder_unchanged: bool = True) -> str:
    """Run, expect exit 2 with ONE stderr line holding every ``expected`` text, and the folder
    unchanged (unless another run is writing it); returns that line."""
    before = folder_hash(out) if out.exists() else None
    proc = cli(args, out)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("itop-train: error: "), proc.stderr[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    if folder_unchanged:
        assert (folder_hash(out) if out.exists() else None) == before, "a refused run changed the folder"
    return lines[0]


def metrics(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> pathlib.Path:
    """One finished run with checkpoints at steps 11, 22, 33 and 44 (copied by each test)."""
    out = tmp_path_factory.mktemp("base") / "run"
    proc = cli(RUN, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def run(base_run, tmp_path) -> pathlib.Path:
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def ckpt(out: pathlib.Path, step: int) -> pathlib.Path:
    return out / "checkpoints" / f"step-{step:08d}"


def reseal(path: pathlib.Path) -> None:
    """Rewrite the manifest for the files as they are now: what someone who crafts a
    checkpoint would do, so only the loader itself stands between the file and the run."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {n: {"size": (path / n).stat().st_size, "sha256": sha256(path / n)}
                         for n in manifest["files"] if (path / n).exists()}
    (path / "manifest.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------
# Pure pieces


def test_state_round_trips_through_tensors_and_json():
    state = {"a": torch.arange(6, dtype=torch.int16).reshape(2, 3), "b": [1, 2.5, None, "x", True],
             "c": {"d": torch.tensor(3.5, dtype=torch.bfloat16), "e": (4, torch.ones(2, dtype=torch.bool))}}
    skeleton, tensors = split_state(state)
    assert sorted(tensors) == ["a", "c/d", "c/e/1"]
    back = join_state(json.loads(json.dumps(skeleton)), tensors)
    assert torch.equal(back["a"], state["a"]) and back["a"].dtype == torch.int16
    assert back["b"] == [1, 2.5, None, "x", True] and back["c"]["e"][0] == 4
    assert back["c"]["d"].dtype == torch.bfloat16 and back["c"]["d"].item() == 3.5
    with pytest.raises(TypeError, match="set is not plain data"):
        split_state({"x": {1, 2}})
    with pytest.raises(TypeError, match="keys must be str"):
        split_state({"x": {0: 1}})


def test_rng_state_round_trips(tmp_path):
    import random

    import numpy as np

    from launcher.checkpoint import write_state

    torch.manual_seed(3), random.seed(4), np.random.seed(5)
    write_state(tmp_path, "rng", RNGState().state_dict())
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    RNGState().load_state_dict(read_state(tmp_path, "rng"))
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


class Box:
    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"value": torch.tensor([self.value])}

    def load_state_dict(self, sd):
        self.value = int(sd["value"][0])


def test_a_step_already_saved_is_not_written_again(tmp_path):
    """A stop signal at a save step saves that step twice: the complete one is kept as is."""
    ck = Checkpointer(tmp_path, keep_last=3)
    box = Box(7)
    ck.register("box", box)
    first = ck.save(5, {"step": 5}, is_best=False)
    before = folder_hash(first)
    box.value = 8
    assert ck.save(5, {"step": 5, "again": True}, is_best=True) == first
    assert folder_hash(first) == before
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["name"] == "step-00000005"
    ck.load(first)
    assert box.value == 7


def test_only_step_folders_are_read_rotated_or_moved(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=1)
    ck.register("box", Box(1))
    keep = tmp_path / "checkpoints" / "step-154-keep"
    bak = tmp_path / "checkpoints" / "step-198.bak"
    for folder in (keep, bak):
        folder.mkdir(parents=True)
        (folder / "note.txt").write_text("mine")
    for step in (10, 20, 30):
        ck.save(step, {"step": step}, is_best=False)
    assert [p.name for p in ck.complete()] == ["step-00000030"]
    assert ck.resolve("auto").name == "step-00000030"
    assert (keep / "note.txt").read_text() == "mine" and (bak / "note.txt").read_text() == "mine"


def test_verify_names_the_damaged_file(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    ck.register("box", Box(1))
    path = ck.save(1, {"step": 1}, is_best=False)
    verify(path)
    data = (path / "box.safetensors").read_bytes()
    (path / "box.safetensors").write_bytes(data[:-3])
    with pytest.raises(CheckpointError, match=r"box\.safetensors has \d+ bytes, the manifest says"):
        verify(path)
    (path / "box.safetensors").write_bytes(data[:-3] + b"xyz")
    with pytest.raises(CheckpointError, match=r"box\.safetensors does not match its SHA-256"):
        verify(path)
    (path / "box.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"box\.safetensors is missing"):
        verify(path)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "custom_checkpoint_0.pkl").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="Accelerate's pickle format"):
        verify(legacy)


def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    with pytest.raises(CheckpointError, match=rf"in use by another run \(PID {os.getpid()} on"):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / ".lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "job": None}))
    note = RunLock(tmp_path).acquire()
    assert note is not None and f"stale lock {tmp_path / '.lock'} of PID {dead.pid}" in note
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "job": None}))
    with pytest.raises(CheckpointError, match="PID 1 on elsewhere"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job requeued on another node
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "job": "4242"}))
    assert "stale lock" in RunLock(tmp_path).acquire()


# ---------------------------------------------------------------------------------------------
# Loading runs no code


class Payload:
    """Unpickling this creates the marker file: proof that code from the checkpoint ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def payload_bytes(marker: pathlib.Path) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"state": Payload(marker)}, buf)  # a torch.load-able pickle, as Accelerate writes
    return buf.getvalue()


POSITIONS = ["model.safetensors", "model.json", "optimizer.safetensors", "optimizer.json",
             "scheduler.json", "train_state.json", "sparse_state.safetensors", "sparse_state.json",
             "flops.json", "rng_state-0.safetensors", "rng_state-0.json", "meta.json", "manifest.json"]


def refused_here(args: str, out: pathlib.Path, capsys, *expected: str) -> str:
    """:func:`refused` in this process (the entry point's ``main``; no interpreter start)."""
    from launcher.train import main

    before = folder_hash(out)
    capsys.readouterr()
    code = main(shlex.split(args) + ["--output-dir", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("itop-train: error: "), err[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    assert folder_hash(out) == before, "a refused run changed the folder"
    return lines[0]


@pytest.mark.slow
def test_a_crafted_file_in_any_position_is_refused_and_never_runs(run, tmp_path, capsys):
    path = ckpt(run, 44)
    assert sorted(json.loads((path / "manifest.json").read_text())["files"]) == sorted(
        p for p in POSITIONS if p != "manifest.json")
    for position in POSITIONS:
        marker = tmp_path / f"ran-{position}"
        original = (path / position).read_bytes()
        (path / position).write_bytes(payload_bytes(marker))
        if position != "manifest.json":
            reseal(path)
        refused_here(f"{RUN} --resume {path}", run, capsys, str(path / position))
        assert not marker.exists(), f"{position}: the payload ran"
        (path / position).write_bytes(original)
        reseal(path)
    # The same through the command line, once: exit status 2, one line.
    (path / "optimizer.safetensors").write_bytes(payload_bytes(tmp_path / "ran-cli"))
    reseal(path)
    refused(f"{RUN} --resume {path}", run, str(path / "optimizer.safetensors"))
    assert not (tmp_path / "ran-cli").exists()
    # Pickles beside a good checkpoint (Accelerate's file names) are never read.
    good = ckpt(run, 33)
    marker = tmp_path / "ran-beside"
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "pytorch_model.bin",
                 "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (good / name).write_bytes(payload_bytes(marker))
    assert main(shlex.split(f"{RUN} --resume {good} --output-dir {run}")) == 0
    assert not marker.exists()
    assert metrics(run)[-1]["step"] == 44 and metrics(run)[-1]["summary"]


# ---------------------------------------------------------------------------------------------
# A damaged checkpoint is named, and the last good one is used


def _truncate(p: pathlib.Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


DAMAGE = {
    "optimizer.safetensors truncated": ("optimizer.safetensors", _truncate),
    "model.safetensors empty": ("model.safetensors", lambda p: p.write_bytes(b"")),
    "sparse_state missing": ("sparse_state.json", lambda p: p.unlink()),
    "meta.json not JSON": ("meta.json", lambda p: p.write_text("{not json")),
    "train_state.json with a byte flipped": ("train_state.json",
                                             lambda p: p.write_bytes(p.read_bytes().replace(b"4", b"5", 1))),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_skipped_by_auto_and_named_by_path(run, kind, capsys):
    name, damage = DAMAGE[kind]
    damage(ckpt(run, 44) / name)
    refused_here(f"{RUN} --resume {ckpt(run, 44)}", run, capsys, str(ckpt(run, 44) / name))
    assert main(shlex.split(f"{RUN} --resume auto --output-dir {run}")) == 0
    stdout = capsys.readouterr().out
    warnings = [line for line in stdout.splitlines() if "skipping damaged checkpoint" in line]
    assert len(warnings) == 1 and str(ckpt(run, 44) / name) in warnings[0], stdout[-3000:]
    assert f"resumed from {ckpt(run, 33)} at step 33" in stdout
    assert metrics(run)[-1]["summary"] and metrics(run)[-1]["step"] == 44
    aside = list((run / "checkpoints").glob("abandoned-*"))
    assert len(aside) == 1 and (aside[0] / "step-00000044").is_dir()  # kept, out of the way
    verify(ckpt(run, 44))  # the step re-trained and saved again, complete


@pytest.mark.slow
def test_a_corrupt_best_json_is_a_warning_not_a_crash(run):
    (run / "checkpoints" / "best.json").write_text("\x00garbage")
    proc = cli(f"{RUN} --epochs 3 --resume auto", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert metrics(run)[-1]["step"] == 66
    assert f"warning: {run / 'checkpoints' / 'best.json'} is unreadable" in proc.stdout


@pytest.mark.slow
def test_every_checkpoint_damaged_is_refused(run, capsys):
    for step in (11, 22, 33, 44):
        (ckpt(run, step) / "flops.json").write_text("[]")
    refused_here(f"{RUN} --resume auto", run, capsys, "none of the 4 checkpoints", "verifies")


def _mount_tmpfs(folder: pathlib.Path, size: str) -> None:
    folder.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {proc.stderr.strip()}")


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoint_survives(base_run, tmp_path):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "4m")
    try:
        out = disk / "run"
        shutil.copytree(base_run / "checkpoints" / "step-00000044", out / "checkpoints" / "step-00000044")
        good = folder_hash(out / "checkpoints")
        # Fill the disk but for ~200 KB: enough for the log, not for a checkpoint (~0.7 MB).
        filler = disk / "filler"
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        os.truncate(filler, filler.stat().st_size - (200_000 - free))
        proc = cli(f"{RUN} --epochs 3 --resume auto", out)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert "checkpoint step-00000055 not written" in lines[0] and "No space left on device" in lines[0]
        assert f"the previous checkpoint {out / 'checkpoints' / 'step-00000044'} is intact" in lines[0]
        assert not list((out / "checkpoints").glob(".tmp-*"))
        filler.unlink()
        assert folder_hash(out / "checkpoints") == good
        verify(out / "checkpoints" / "step-00000044")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ---------------------------------------------------------------------------------------------
# Nothing in a run folder is lost or mixed


@pytest.mark.slow
def test_a_new_run_in_a_folder_with_checkpoints_is_refused(run, capsys):
    refused_here(RUN, run, capsys, "already holds checkpoints", "--resume auto")
    refused_here(f"{RUN} --lr 0.5", run, capsys, "already holds checkpoints")


@pytest.mark.slow
def test_refused_resumes_leave_the_folder_as_it_was(run, capsys):
    refused_here(f"{RUN} --density 0.2 --resume auto", run, capsys, "sparsity.density: 0.1 -> 0.2")
    refused_here(f"{RUN} --pre_train --cyclic_train --cycle 1 --cycle_rate 0.5 --resume auto", run, capsys,
                 "belongs to another run", "tickets.enabled: False -> True")
    # The same run continued with another multiplier or LR is another run (the SLURM scripts
    # always pass --resume auto: this must not silently continue the 1x run).
    refused_here(f"{RUN} --multiplier 2 --resume auto", run, capsys, "schedule.multiplier: 1.0 -> 2.0")
    refused_here(f"{RUN} --lr 0.5 --resume auto", run, capsys, "optim.lr: 0.1 -> 0.5")
    refused_here(f"{RUN} --resume {run / 'checkpoints' / 'step-00000007'}", run, capsys, "is not a folder")
    (run / ".lock").write_text(json.dumps({"pid": 1, "host": "another-node", "job": None}))
    refused_here(f"{RUN} --resume auto", run, capsys, "in use by another run (PID 1 on another-node)")


@pytest.mark.slow
def test_a_piece_of_state_the_run_does_not_have_is_named(run, capsys):
    """Beside the identity check: a checkpoint holding Sup-tickets state, resumed without it."""
    path = ckpt(run, 44)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["pieces"].append("supertickets")
    (path / "manifest.json").write_text(json.dumps(manifest))
    refused_here(f"{RUN} --resume {path}", run, capsys, "holds the supertickets state",
                 "Sup-tickets: --pre_train --cyclic_train", "this run has it off")


@pytest.mark.slow
def test_two_runs_at_once_on_one_folder(tmp_path):
    out = tmp_path / "run"
    # Long enough that it is still running when the second run (a fresh interpreter) gets there.
    first = subprocess.Popen([sys.executable, "-m", "launcher.train", *shlex.split(f"{BASE} --epochs 3000"),
                              "--output-dir", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = __import__("time").time() + 120
        while not (out / "metrics.jsonl").exists() and __import__("time").time() < deadline:
            __import__("time").sleep(0.05)
        lock = (out / ".lock").read_bytes()
        line = refused(f"{BASE} --epochs 3000 --resume auto", out, "in use by another run",
                       folder_unchanged=False)  # the first run is writing it
        assert (out / ".lock").read_bytes() == lock and first.poll() is None
        assert f"PID {first.pid} on" in line
    finally:
        first.kill()
        first.wait()
    # Killed: its lock is stale now and the next run takes it over, saying so.
    proc = cli(f"{BASE} --epochs 1 --resume auto", out)
    assert proc.returncode == 0 and f"stale lock {out / '.lock'} of PID {first.pid}" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_resuming_an_older_checkpoint_moves_the_newer_ones_aside_and_rewinds_metrics(run):
    before = metrics(run)
    proc = cli(f"{RUN} --resume {ckpt(run, 22)}", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    aside = list((run / "checkpoints").glob("abandoned-*-from-step-00000022"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir() if p.is_dir()) == [
        "step-00000033", "step-00000044"]
    assert f"moved the checkpoints after step-00000022 aside to {aside[0]}" in proc.stdout
    later = [r for r in before if r.get("step", 0) > 22]
    rewound = [json.loads(x) for x in (run / "metrics-rewound.jsonl").read_text().splitlines()]
    assert rewound == later and len(later) > 5
    steps = [r["step"] for r in metrics(run)]
    assert steps == sorted(steps), "a step went backwards in metrics.jsonl"
    assert [r["step"] for r in metrics(run) if r.get("summary")] == [44]
    # The run ends where the uninterrupted one did, and auto now continues from the new chain.
    assert [p.name for p in Checkpointer(run, 5).complete()] == [f"step-{s:08d}" for s in (11, 22, 33, 44)]


# ---------------------------------------------------------------------------------------------
# Another setup: resumes, or one line; elastic resume by epoch and sample position

ACCELERATE = pathlib.Path(sys.executable).parent / "accelerate"
WORKER = REPO / "tests" / "workers" / "dist_train.py"
# Multistep LR halving... by 10 at epoch 1 of 2: the LR of each epoch is known exactly.
ELASTIC = ("--sparse --data digits --model digits-mlp --epochs 2 --batch-size 32 --lr 0.05 "
           "--lr-schedule multistep --milestones 0.5 --update_frequency 8 --density 0.1 "
           "--growth gradient --log-interval 1 --no-progress --no-wandb --no-plots")
LR_BY_EPOCH = {0: 0.05, 1: 0.005}


def launch(out: pathlib.Path, processes: int, extra: str) -> None:
    from test_distributed import free_port

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes),
               "--main_process_port", str(free_port()), str(WORKER)]
    cmd += [*shlex.split(f"{ELASTIC} {extra}"), "--output-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def epoch_samples(world: int, batch: int) -> int:
    from data_pipelines import build_loaders
    from launcher.config import parse_config

    loaders = build_loaders(parse_config(shlex.split(ELASTIC)).data, seed=17, rank=0, world_size=world)
    return len(loaders.train) * batch * world


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("before,after", [
    # from one process; more processes and DDP -> FSDP; fewer and FSDP -> DDP
    (("ddp", 1), ("ddp", 2)), (("ddp", 2), ("fsdp", 3)), (("fsdp", 2), ("ddp", 1)),
], ids=lambda s: f"{s[0]}{s[1]}")
def test_resume_with_another_world_size_or_mode_ends_at_the_requested_epoch(tmp_path, before, after):
    (mode_a, world_a), (mode_b, world_b) = before, after
    out = tmp_path / "run"
    stop = 30 * 2 // world_a  # mid-way through epoch 1 for 2 processes (22 steps per epoch)
    launch(out, world_a, f"--sharding {mode_a} --max-steps {stop}")
    proc = launch(out, world_b, f"--sharding {mode_b} --resume auto")
    if world_a != world_b:
        assert f"the global batch changed from {32 * world_a} to {32 * world_b}" in proc.stdout
    records = metrics(out)
    summary = records[-1]
    assert summary["summary"] and summary["epoch"] == 2 and summary["world_size"] == world_b
    assert summary["final_density"] == pytest.approx(0.1, abs=1e-3) and summary["ranks_identical"]
    # Every step trains at the LR of its epoch (a record logs the LR of the step after it).
    steps = [r for r in records if "train/lr" in r]
    assert [r["step"] for r in steps] == list(range(1, summary["step"] + 1))  # none twice or back
    for r, nxt in zip(steps, steps[1:]):
        assert r["train/lr"] == pytest.approx(LR_BY_EPOCH[nxt["epoch"]]), (r, nxt)
    assert {r["epoch"] for r in steps} == {0, 1}
    # Samples: epoch 0 = the first run's part + the rest in the new setup (no sample twice),
    # epoch 1 whole in the new setup.
    flops = read_state(ckpt(out, summary["step"]), "flops")
    first = stop * 32 * world_a
    gb = 32 * world_b
    rest = epoch_samples(world_b, 32) - -(-first // gb) * gb
    assert flops["samples"] == first + rest + epoch_samples(world_b, 32)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_b)]
    for other in ranks[1:]:
        for key in ("masks", "fired", "weights"):
            assert all(torch.equal(ranks[0][key][n], other[key][n]) for n in ranks[0][key])
    for name, m in ranks[0]["masks"].items():
        assert not ranks[0]["weights"][name][~m].any()


@pytest.mark.slow
def test_an_output_dir_that_is_a_file_or_read_only_is_one_line(tmp_path, capsys):
    from launcher.train import main

    args = "--sparse --data digits --model digits-mlp --epochs 1 --update_frequency 10 --no-wandb --device cpu"
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(shlex.split(f"{args} --output-dir {afile}")) == 2
    assert capsys.readouterr().err.strip() == (f"itop-train: error: --output-dir {afile} is a file, not a "
                                               f"folder; choose another --output-dir")
    assert afile.read_text() == "mine"
    assert main(shlex.split(f"{args} --output-dir {afile / 'run'}")) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_a_sharded_piece_is_read_block_by_block(tmp_path):
    """Each rank's blocks (FSDP's uneven dim-0 chunks: rows 0-3 and 4-6 of 7) come back whole,
    or as any region read from the overlapping blocks only; a missing block is refused."""
    from launcher.checkpoint import Shard, write_state

    full = torch.arange(21, dtype=torch.float32).reshape(7, 3)
    write_state(tmp_path, "model-shard-0", {"w": Shard(full[:4], (7, 3), (0, 0)), "b": torch.tensor([1.0, 2.0])})
    write_state(tmp_path, "model-shard-1", {"w": Shard(full[4:], (7, 3), (4, 0))})
    lazy = read_state(tmp_path, "model", lazy=True)
    assert torch.equal(lazy["w"].region((3, 1), (3, 2)), full[3:6, 1:])  # across both blocks
    assert torch.equal(lazy["w"].region((5, 0), (2, 3)), full[5:])  # from rank 1's block only
    assert torch.equal(read_state(tmp_path, "model")["w"], full)
    assert torch.equal(lazy["b"], torch.tensor([1.0, 2.0]))
    for suffix in (".json", ".safetensors"):
        (tmp_path / f"model-shard-1{suffix}").unlink()
    with pytest.raises(CheckpointError, match=r"do not cover its part at \[0, 0\] of shape \[7, 3\] exactly once"):
        read_state(tmp_path, "model")


def test_blocks_that_overlap_or_claim_more_than_their_files_hold_are_refused_before_allocating(tmp_path):
    """Coverage is checked as boxes, not counts: rank 1's block at rows 3-5 (instead of 4-6)
    overlaps rank 0's row 3 and leaves row 6 unwritten with the right total count (7 x 3); a
    global shape of 7e6 x 3000 (84 GB as float32) that the files cannot fill is refused before
    anything of that size is allocated; a shard file that is not safetensors is named."""
    from launcher.checkpoint import Shard, write_state

    full = torch.arange(21, dtype=torch.float32).reshape(7, 3)

    def write(folder, rows_1, shape=(7, 3)):
        folder.mkdir()
        write_state(folder, "model-shard-0", {"w": Shard(full[:4], shape, (0, 0))})
        write_state(folder, "model-shard-1", {"w": Shard(full[rows_1], shape, (rows_1.start, 0))})
        return folder

    overlap = write(tmp_path / "overlap", slice(3, 6))
    with pytest.raises(CheckpointError, match=r"do not cover its part at \[0, 0\] of shape \[7, 3\] exactly once"):
        read_state(overlap, "model")
    lazy = read_state(overlap, "model", lazy=True)  # a region the overlap does not touch still reads
    assert torch.equal(lazy["w"].region((0, 0), (3, 3)), full[:3])
    huge = write(tmp_path / "huge", slice(4, 7), shape=(7_000_000, 3000))
    with pytest.raises(CheckpointError, match=r"shape \[7000000, 3000\] do not cover"):
        read_state(huge, "model")
    bad = write(tmp_path / "bad", slice(4, 7))
    (bad / "model-shard-1.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model-shard-1.safetensors: not a readable safetensors file"):
        read_state(bad, "model")
