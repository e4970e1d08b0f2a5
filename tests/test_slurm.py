"""SLURM support: the sbatch scripts of slurm/ and their launcher, on a real local cluster.

The cluster (tests/slurm_cluster.py) is Debian's slurm-wlm + munge on 127.0.0.1 with two
slurmd playing two nodes. On it the CPU variant of the multi-node script (slurm/multinode_cpu.sbatch,
2 nodes x 1 process, gloo) trains to completion with identical masks on both ranks; and a run
that gets the warning signal mid-way checkpoints, requeues itself, resumes and ends exactly as
the uninterrupted run. The launcher's derivations (machine rank, head node, processes, port,
resume, W&B offline) are also checked without a cluster, with a stand-in `scontrol`.
Without slurm-wlm and munge installed (and root), the cluster tests skip and say why.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import struct
import subprocess
import sys
import time

import pytest
import torch

from slurm_cluster import NODES, LocalCluster, free_ports, why_unavailable

REPO = pathlib.Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
LAUNCH = SLURM / "launch.sh"
SCRIPTS = sorted(SLURM.glob("*.sbatch"))
WORKER = "tests/workers/dist_train.py"  # the trainer, plus rank<R>.pt with masks/fired/weights
# 2 ranks x 32: 22 steps per epoch, 660 in 30 epochs (about 7 s of training on 2 cores: room
# to signal mid-run); every step logged, so a step trained twice or skipped would show.
ARGS = ("--sparse --data digits --model digits-mlp --epochs 30 --batch-size 32 --lr 0.05 "
        "--lr-schedule constant --update_frequency 8 --density 0.1 --growth gradient "
        "--no-progress --no-plots --log-interval 1")
STEPS = 660

pytestmark = pytest.mark.slurm


# ---------------------------------------------------------------------------------------------
# The scripts themselves


def test_there_is_a_script_for_each_job():
    assert {p.name for p in SCRIPTS} == {"cifar_1gpu.sbatch", "imagenet_1node.sbatch",
                                         "imagenet_multinode.sbatch", "multinode_cpu.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_are_thin_and_site_neutral(script):
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.M)
    names = {d.split("=")[0] for d in directives}
    assert {"--requeue", "--signal", "--open-mode", "--nodes", "--ntasks-per-node"} <= names
    assert re.search(r"^#SBATCH --signal=USR1@\d+$", text, flags=re.M), "warning signal to every task"
    assert "--open-mode=append" in directives  # a requeued job appends to its log
    # Partition, account and time are the submitter's (sbatch -p/-A/-t), never baked in.
    assert not names & {"--partition", "-p", "--account", "-A", "--time", "-t", "--qos", "--reservation"}
    code = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    sruns = [ln for ln in code if ln.lstrip().startswith("srun")]
    assert len(sruns) == 1 and '/slurm/launch.sh" "$@"' in sruns[0] and "--ntasks-per-node=1" in sruns[0]
    assert len(code) <= 5, code  # resources above, environment, one srun line


# ---------------------------------------------------------------------------------------------
# The launcher's derivations, with a stand-in scontrol (no cluster needed)

FAKE_SCONTROL = """#!/bin/sh
case "$1 $2" in
  "show hostnames") printf 'gpu-a17\\ngpu-a18\\n' ;;
  "show node") printf 'NodeName=%s Arch=x86_64 CoresPerSocket=32\\n   NodeAddr=10.1.2.17 NodeHostName=%s\\n' "$3" "$3" ;;
  *) exit 1 ;;
esac
"""


def dry_run(tmp_path: pathlib.Path, recipe: str = "--config configs/x.yaml", **env: str):
    """Run slurm/launch.sh with ITOP_DRY_RUN=1 as task SLURM_PROCID of a fake 2-node job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_", "CUDA_VISIBLE"))}
    full = {**base, "PATH": f"{bin_dir}:{base['PATH']}", "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0",
            "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_NODELIST": "gpu-a[17-18]",
            "SLURM_GPUS_ON_NODE": "4", "SLURMD_NODENAME": "gpu-a18", "SLURM_SUBMIT_DIR": str(REPO),
            "ITOP_VENV": str(tmp_path / "no-venv"), "ITOP_DRY_RUN": "1", "ITOP_WANDB_PROBE": "none"}
    full.update(env)
    full = {k: v for k, v in full.items() if v is not None}
    proc = subprocess.run(["bash", str(LAUNCH), *shlex.split(recipe)], env=full, capture_output=True,
                          text=True, timeout=60)
    cmd = shlex.split(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else []
    return proc, cmd


def option(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


@pytest.mark.parametrize("rank", ["0", "1"])
def test_launcher_takes_the_machine_rank_head_and_port_inside_each_task(tmp_path, rank):
    proc, cmd = dry_run(tmp_path, SLURM_PROCID=rank)
    assert proc.returncode == 0, proc.stderr
    assert cmd[:2] == ["accelerate", "launch"] and "--multi_gpu" in cmd
    assert option(cmd, "--machine_rank") == rank
    assert option(cmd, "--num_machines") == "2"
    assert option(cmd, "--num_processes") == "8"  # 4 GPUs allotted per node x 2 nodes
    assert option(cmd, "--main_process_ip") == "10.1.2.17"  # the first node's NodeAddr
    assert option(cmd, "--main_process_port") == str(15000 + 123456 % 15000)  # same on every node
    i = cmd.index("-m")
    assert cmd[i:i + 4] == ["-m", "launcher.train", "--resume", "auto"]
    assert cmd[-2:] == ["--config", "configs/x.yaml"]
    assert f"machine {rank}/2, head gpu-a17" in proc.stdout


def test_launcher_refuses_to_run_in_the_batch_shell(tmp_path):
    """In the batch shell SLURM_PROCID/SLURM_NODEID are 0 on every node: no silent rank 0."""
    proc, _ = dry_run(tmp_path, SLURM_STEP_ID=None)
    assert proc.returncode == 2 and "run me with srun" in proc.stderr


def test_launcher_counts_the_gpus_it_was_given(tmp_path):
    _, cmd = dry_run(tmp_path, SLURM_GPUS_ON_NODE=None, CUDA_VISIBLE_DEVICES="0,1,2")
    assert option(cmd, "--num_processes") == "6"
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found'\n")
    (tmp_path / "bin" / "nvidia-smi").chmod(0o755)  # a node without GPUs, even on a GPU machine
    proc, _ = dry_run(tmp_path, SLURM_GPUS_ON_NODE=None)
    assert proc.returncode == 2 and "no GPU allotted" in proc.stderr
    _, cmd = dry_run(tmp_path, SLURM_GPUS_ON_NODE=None, ITOP_DEVICE="cpu", ITOP_PROCS_PER_NODE="3")
    assert option(cmd, "--num_processes") == "6"
    _, cmd = dry_run(tmp_path, SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0", SLURM_GPUS_ON_NODE="1")
    assert option(cmd, "--num_processes") == "1" and "--multi_gpu" not in cmd  # one GPU: no rendezvous


def test_a_requeued_job_resumes_its_own_latest_checkpoint(tmp_path):
    _, first = dry_run(tmp_path, "--resume runs/old/checkpoints/step-00000100")
    resumes = [first[i + 1] for i, a in enumerate(first) if a == "--resume"]
    assert resumes == ["auto", "runs/old/checkpoints/step-00000100"]  # the explicit one wins ...
    _, again = dry_run(tmp_path, "--resume runs/old/checkpoints/step-00000100", SLURM_RESTART_COUNT="1")
    assert [again[i + 1] for i, a in enumerate(again) if a == "--resume"][-1] == "auto"  # ... once


def test_wandb_goes_offline_where_it_cannot_reach_the_server(tmp_path):
    closed = f"127.0.0.1:{free_ports(1)[0]}"
    proc, cmd = dry_run(tmp_path, ITOP_WANDB_PROBE=closed)
    assert option(cmd, "--wandb-mode") == "offline" and "W&B logs offline" in proc.stdout
    for recipe, env in (("--no-wandb", {}), ("--wandb-mode online", {}), ("", {"WANDB_MODE": "online"})):
        _, cmd = dry_run(tmp_path, recipe, ITOP_WANDB_PROBE=closed, **env)
        assert cmd.count("--wandb-mode") == recipe.count("--wandb-mode"), (recipe, env)


# ---------------------------------------------------------------------------------------------
# A real cluster


@pytest.fixture(scope="session")
def cluster():
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def job_env(cluster: LocalCluster) -> dict[str, str]:
    return {**cluster.env, "ITOP_VENV": sys.prefix, "ITOP_ENTRYPOINT": WORKER,
            "ITOP_WANDB_PROBE": f"127.0.0.1:{free_ports(1)[0]}",  # 'no internet', decided at once
            "OMP_NUM_THREADS": "1"}


def sbatch(cluster: LocalCluster, out: pathlib.Path, extra: str, *sbatch_opts: str, wait: bool):
    cmd = ["sbatch", "--parsable", f"--output={out}.log", *(["--wait"] if wait else []), *sbatch_opts,
           str(SLURM / "multinode_cpu.sbatch"), *shlex.split(f"{ARGS} {extra}"), "--output-dir", str(out)]
    return subprocess.run(cmd, cwd=REPO, env=job_env(cluster), capture_output=True, text=True, timeout=400)


def records(run: pathlib.Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written
            pass
    return found


def ranks(run: pathlib.Path) -> list[dict]:
    return [torch.load(run / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_identical(a: dict, b: dict, what: str) -> None:
    for key in ("masks", "fired", "weights"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{what}: {key} of {name} differ"


def launch_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if ln.startswith("launch: job ")]


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm") / "full"
    proc = sbatch(cluster, out, "--no-wandb", wait=True)
    log = pathlib.Path(f"{out}.log").read_text() if pathlib.Path(f"{out}.log").exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{log[-4000:]}\n{cluster.log_tail()}"
    return out, proc.stdout.strip(), log


@pytest.fixture(scope="module")
def preempted(cluster, tmp_path_factory):
    """The same job; SIGUSR1 to every task once it has trained 30 steps, as --signal=USR1@T does."""
    out = tmp_path_factory.mktemp("slurm") / "preempted"
    proc = sbatch(cluster, out, "", wait=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = proc.stdout.strip().split(";")[0]
    end = time.monotonic() + 240
    while max((r.get("step", 0) for r in records(out) if "train/loss" in r), default=0) < 30:
        assert time.monotonic() < end, f"no progress\n{cluster.log_tail()}"
        assert cluster.job(job)["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), cluster.job(job)
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", job)  # every step's processes, not the batch shell
    while (info := cluster.job(job))["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                         "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
        assert time.monotonic() < end, f"job {job} still {info['JobState']}\n{cluster.log_tail()}"
        time.sleep(0.5)
    return out, info, pathlib.Path(f"{out}.log").read_text()


@pytest.mark.slow
@pytest.mark.dist
def test_the_cpu_multinode_script_trains_on_two_nodes(cluster, uninterrupted):
    out, job, log = uninterrupted
    info = cluster.job(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0" and info["NumNodes"] == "2"
    # One task per node; each found its own machine rank, the same head node and port.
    lines = sorted(launch_lines(log), key=lambda ln: "machine 1/2" in ln)
    assert len(lines) == 2, log[-3000:]
    for rank, (line, node) in enumerate(zip(lines, NODES)):
        assert f"(node {node}): machine {rank}/2, head n1 at 127.0.0.1:{15000 + int(job) % 15000}" in line
        assert "1 cpu process(es) per node, 2 in all" in line
    r0, r1 = ranks(out)
    assert_identical(r0, r1, "rank 0 vs rank 1")
    summary = r0["summary"]
    assert summary["step"] == STEPS and summary["world_size"] == 2 and summary["ranks_identical"]
    assert records(out)[-1]["summary"] is True


@pytest.mark.slow
@pytest.mark.dist
def test_the_warning_signal_checkpoints_requeues_and_resumes(cluster, uninterrupted, preempted):
    out, info, log = preempted
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    stops = [r for r in records(out) if r.get("preempted")]
    assert len(stops) == 1 and stops[0]["requeued"] is True and stops[0]["signal"] == 10, stops
    stop = stops[0]["step"]
    assert 30 <= stop < STEPS and stop % 10 == 0  # the ranks agree every 10 steps
    assert re.search(rf"resumed from \S+/checkpoints/step-{stop:08d} at step {stop} ", log), log[-3000:]
    assert [ln.split(" task ")[0] for ln in launch_lines(log)] == (
        ["launch: job " + info["JobId"] + " restart 0"] * 2 + ["launch: job " + info["JobId"] + " restart 1"] * 2)
    # Nothing trained twice, nothing skipped: every step's training record exactly once.
    steps = [r["step"] for r in records(out) if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1))
    # The same end as the uninterrupted run: step count, masks, explored union, weights.
    full = ranks(uninterrupted[0])[0]
    r0, r1 = ranks(out)
    assert r0["summary"]["step"] == full["summary"]["step"] == STEPS and r0["summary"]["ranks_identical"]
    assert r0["updates"] == full["updates"]
    assert_identical(r0, full, "resumed vs uninterrupted")
    assert_identical(r0, r1, "rank 0 vs rank 1")
    # W&B (offline: no internet here): one run, continued by the requeued job; the sync step printed.
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in runs}) == 1, runs
    assert f"wandb sync {out.resolve()}/wandb/offline-run-*" in log


def wandb_steps(run_file: pathlib.Path) -> list[int]:
    """The history steps in a .wandb file (a LevelDB-style log of protobuf records, 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending, steps = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                steps += [int(json.loads(i.value_json)) for i in record.history.item
                          if i.key == "_step" or list(i.nested_key) == ["_step"]]
    return steps


@pytest.mark.slow
@pytest.mark.dist
def test_wandb_keeps_every_step_across_the_requeue(preempted):
    out, _, _ = preempted
    stop = next(r["step"] for r in records(out) if r.get("preempted"))
    first, second = [wandb_steps(next(p.glob("run-*.wandb"))) for p in sorted((out / "wandb").glob("offline-run-*"))]
    assert first and max(first) == stop, (max(first, default=None), stop)
    assert min(second) == stop + 1 and max(second) == STEPS


# ---------------------------------------------------------------------------------------------
# ITOP_DRY_RUN=1 outside a SLURM job (no cluster, no scontrol needed)


def test_dry_run_outside_a_job_previews_each_node(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_", "CUDA_VISIBLE"))}
    env.update({"PATH": "/usr/bin:/bin", "ITOP_DRY_RUN": "1", "ITOP_WANDB_PROBE": "none",
                "ITOP_VENV": str(tmp_path / "no-venv"), "ITOP_ROOT": str(REPO), "ITOP_HEAD_ADDR": "10.0.0.5"})

    def launch(*args: str, **extra: str):
        proc = subprocess.run(["bash", str(LAUNCH), *args], env={**env, **extra}, capture_output=True,
                              text=True, timeout=60)
        return proc, (shlex.split(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else [])

    for rank in ("0", "1"):
        proc, cmd = launch("--nodes", "2", "--gpus-per-node", "8", "--machine-rank", rank, "--config", "configs/x.yaml")
        assert proc.returncode == 0, proc.stderr
        assert cmd[:2] == ["accelerate", "launch"] and "--multi_gpu" in cmd
        assert option(cmd, "--num_machines") == "2" and option(cmd, "--num_processes") == "16"
        assert option(cmd, "--machine_rank") == rank and option(cmd, "--main_process_ip") == "10.0.0.5"
        assert option(cmd, "--main_process_port") == "15000"  # job id 0
        assert cmd[-2:] == ["--config", "configs/x.yaml"] and "--nodes" not in cmd
        assert f"machine {rank}/2" in proc.stdout
    _, cmd = launch("--nodes=1", "--gpus-per-node=1", "--sparse")  # one GPU: no rendezvous
    assert option(cmd, "--num_processes") == "1" and "--multi_gpu" not in cmd and cmd[-1] == "--sparse"
    _, cmd = launch("--nodes", "3", "--sparse", ITOP_DEVICE="cpu", ITOP_PROCS_PER_NODE="2")
    assert option(cmd, "--num_processes") == "6" and option(cmd, "--machine_rank") == "0"
    proc, _ = launch("--nodes", "2", "--machine-rank", "2")
    assert proc.returncode == 2 and "--machine-rank 2" in proc.stderr
    proc, _ = launch("--nodes", "2", ITOP_DRY_RUN="0")  # a real launch still needs a job
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr
