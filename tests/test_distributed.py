"""Two processes with real ``accelerate launch`` on gloo: identical connectivity, replicated
(DDP) and sharded (FSDP2), two 'machines' on 127.0.0.1, mask corruption caught, resume."""

import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
ACCELERATE = pathlib.Path(sys.executable).parent / "accelerate"
WORKER = REPO / "tests" / "workers" / "dist_train.py"
# 2 ranks x 32 per rank: 22 steps per epoch; updates every 8 steps: 8 updates in 3 epochs.
ARGS = ("--sparse --data digits --model digits-mlp --epochs 3 --batch-size 32 --lr 0.05 "
        "--lr-schedule constant --update_frequency 8 --density 0.1 --no-progress")

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: pathlib.Path, extra: str, machines: int = 1, expect_ok: bool = True) -> None:
    """accelerate launch 2 processes of the worker (as 1 machine, or 2 machines of 1 each)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    port = free_port()
    args = [str(WORKER), *shlex.split(f"{ARGS} {extra}"), "--output-dir", str(out)]
    if machines == 1:
        cmds = [[str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2",
                 "--main_process_port", str(port), *args]]
    else:
        cmds = [[str(ACCELERATE), "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank",
                 str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                 "--num_processes", "2", *args] for rank in range(2)]
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in cmds]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    if expect_ok:
        assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)


def ranks(out: pathlib.Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def assert_identical(a: dict, b: dict) -> None:
    for key in ("masks", "fired", "weights"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} of {name} differ across ranks"


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
@pytest.mark.parametrize("growth", ["random", "gradient"])
def test_two_processes_train_one_sparse_network(tmp_path, sharding, growth):
    launch(tmp_path, f"--sharding {sharding} --growth {growth}")
    r0, r1 = ranks(tmp_path)
    assert_identical(r0, r1)
    assert r0["updates"] == r1["updates"] == 8
    masked = sum(m.numel() for m in r0["masks"].values())
    nnz = sum(int(m.sum()) for m in r0["masks"].values())
    assert abs(nnz - 0.1 * masked) <= len(r0["masks"])
    assert r0["summary"]["step"] == 66 and r0["summary"]["ranks_identical"]
    assert r0["summary"]["final_itop_rate"] > 0.11  # explored beyond the initial 10%
    for name, m in r0["masks"].items():
        assert not r0["weights"][name][~m].any(), f"masked weights of {name} not zero"
    if sharding == "fsdp":  # each rank really holds half of every large parameter
        big = {n: s for n, s in r0["shards"].items() if s[1] >= 2048}
        assert big and all(local * 2 == total for local, total in big.values()), r0["shards"]
    else:
        assert r0["shards"] == {}


def test_two_machines_on_localhost(tmp_path):
    launch(tmp_path, "--growth gradient", machines=2)
    r0, r1 = ranks(tmp_path)
    assert_identical(r0, r1)
    assert r0["summary"]["world_size"] == 2


def test_a_mask_corrupted_on_one_rank_stops_every_rank_at_the_next_update(tmp_path):
    launch(tmp_path, "--growth random --corrupt-at 11", expect_ok=False)
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in range(2)]
    for err in errors:  # corrupted before step 11; the update at step 16 finds it
        assert err.startswith("MaskMismatchError: masks differ across ranks: first differing layer "
                              "'fc2.weight' on rank(s) [1]"), err
    assert not (tmp_path / "rank0.pt").exists()


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_resumed_two_process_run_matches_uninterrupted(tmp_path, sharding):
    full, part = tmp_path / "full", tmp_path / "part"
    launch(full, f"--sharding {sharding} --growth gradient")
    launch(part, f"--sharding {sharding} --growth gradient --max-steps 30")
    launch(part, f"--sharding {sharding} --growth gradient --resume auto")
    assert_identical(ranks(full)[0], ranks(part)[0])
    assert_identical(ranks(part)[0], ranks(part)[1])


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_gradient_accumulation_across_ranks(tmp_path, sharding):
    """Gradients sync on the last micro-batch only; the mask hook sees the accumulated one."""
    launch(tmp_path, f"--sharding {sharding} --growth gradient --grad-accum-steps 2")
    r0, r1 = ranks(tmp_path)
    assert_identical(r0, r1)
    assert r0["summary"]["step"] == 33 and r0["updates"] == 4  # 11 steps per epoch


def test_accelerate_config_files(tmp_path):
    """The shipped configs load; the FSDP one shards through Accelerate's own launcher."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = REPO / "launcher" / "accelerate"
    kinds = {p.stem: load_config_from_file(str(p)) for p in folder.glob("*.yaml")}
    assert set(kinds) == {"single_gpu", "multi_gpu", "multi_node", "fsdp"}
    assert kinds["single_gpu"].num_processes == 1
    assert kinds["multi_node"].num_machines == 2 and kinds["multi_node"].distributed_type == "MULTI_GPU"
    assert kinds["fsdp"].distributed_type == "FSDP"
    # The FSDP config, as a user would adapt it for 2 CPU processes.
    text = (folder / "fsdp.yaml").read_text()
    cpu = tmp_path / "fsdp_cpu.yaml"
    cpu.write_text(text.replace("num_processes: 8", "num_processes: 2").replace("use_cpu: false", "use_cpu: true")
                   .replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(ACCELERATE), "launch", "--config_file", str(cpu), "--main_process_port",
                           str(free_port()), str(WORKER), *shlex.split(ARGS), "--epochs", "1",
                           "--output-dir", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r0, r1 = ranks(out)
    assert r0["summary"]["sharding"] == "fsdp" and r0["shards"]["fc2.weight"] == (32768, 65536)
    assert_identical(r0, r1)


def test_granet_two_processes_identical_masks(tmp_path):
    launch(tmp_path, "--method GraNet --init-density 0.5 --final-density 0.1 --init-prune-epoch 0 "
                     "--final-prune-epoch 2 --growth gradient --sharding fsdp")
    r0, r1 = ranks(tmp_path)
    assert_identical(r0, r1)
    nnz = sum(int(m.sum()) for m in r0["masks"].values())
    assert nnz == round(0.1 * sum(m.numel() for m in r0["masks"].values()))


def test_suptickets_two_processes_superpose_and_recalibrate_identically(tmp_path):
    """BN recalibration runs on each rank's shard; the averaged statistics are the same everywhere."""
    launch(tmp_path, "--model digits-mlp-bn --method GraNet --init-density 0.5 --final-density 0.1 "
                     "--final-prune-epoch 1 --epochs 4 --pre_train --cyclic_train --cycle 1 "
                     "--cycle_rate 0.5 --cyc_lr --lr_1 0.01 --lr_2 0.05 --re_explore "
                     "--large-death-rate 0.5 --no_maskupdates --update_bn")
    r0, r1 = ranks(tmp_path)
    assert_identical(r0, r1)
    assert r0["superposed"] and r0["superposed"].keys() == r1["superposed"].keys()
    for k, v in r0["superposed"].items():
        assert torch.equal(v, r1["superposed"][k]), k
    assert r0["summary"]["result"] == "superposed model 2 (Sup-tickets)"


def test_a_mask_corrupted_in_a_static_run_is_caught_at_the_next_log_interval(tmp_path):
    """Static masks never update, so no update would ever compare them: the checksums at every
    --log-interval steps do (corrupted before step 11, caught at step 15, not at the end)."""
    launch(tmp_path, "--fix --growth random --corrupt-at 11 --log-interval 5", expect_ok=False)
    for r in range(2):
        err = (tmp_path / f"rank{r}.err").read_text()
        assert err.startswith("MaskMismatchError: masks differ across ranks: first differing layer "
                              "'fc2.weight' on rank(s) [1]"), err
    steps = [json.loads(x).get("step") for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 15
