"""All ranks provably run the same job: settings compared at start-up, connectivity checked at
every log interval, a rank that never arrives ends the job naming the collective."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ACCELERATE = pathlib.Path(sys.executable).parent / "accelerate"
SHIM = REPO / "tests" / "workers" / "rank_shim.py"
ARGS = ("--sparse --data digits --model digits-mlp --epochs 1 --batch-size 32 --update_frequency 8 "
        "--density 0.1 --no-progress --no-wandb --no-plots")

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def launch(out: pathlib.Path, rank1: dict[str, str], extra: str = "") -> subprocess.CompletedProcess:
    from test_distributed import free_port

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **rank1}
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
           str(free_port()), str(SHIM), *shlex.split(f"{ARGS} {extra}"), "--output-dir", str(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("flag,value,line", [
    ("--seed", "99", "seed: rank 0 has 17, rank 1 has 99"),
    ("--update_frequency", "9", "sparsity.update_frequency: rank 0 has 8, rank 1 has 9"),
    ("--lr", "0.5", "optim.lr: rank 0 has 0.1, rank 1 has 0.5"),
])
def test_a_rank_started_with_another_setting_stops_every_rank_at_start(tmp_path, flag, value, line):
    proc = launch(tmp_path / "run", {"ITOP_TEST_RANK1_ARGS": f"{flag} {value}"})
    errors = [x for x in proc.stderr.splitlines() if x.startswith("itop-train: error:")]
    assert proc.returncode != 0 and len(errors) == 2, proc.stderr[-3000:]  # both ranks, one line each
    for error in errors:
        assert "the processes of this job were started with different settings" in error and line in error
    assert "launcher/trainer.py" not in proc.stderr  # no traceback of ours (the launcher prints its own)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_rank_that_never_arrives_ends_the_job_naming_the_collective(tmp_path):
    proc = launch(tmp_path / "run", {"ITOP_TEST_RANK1_SLEEP": "40"}, "--dist-timeout 0.1")
    assert proc.returncode != 0
    assert "CollectiveTimeout: broadcast_objects: rank 0 waited past --dist-timeout" in proc.stderr, \
        proc.stderr[-3000:]
