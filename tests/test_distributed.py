"""Real ``accelerate launch`` on gloo: identical connectivity in every ZeRO stage (ddp, zero1,
zero2, zero3 with 2 processes; hsdp as 2 x 2), two 'machines' on 127.0.0.1, mask corruption
caught, bit-exact resume, resume across stages and world sizes; a timm ViT in every stage."""

import json
import math
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from itop_dist.topology import erk_densities, exact_count
from launcher.config import FSDP_STAGES

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


def launch(out: pathlib.Path, extra: str, machines: int = 1, expect_ok: bool = True, processes: int = 2) -> None:
    """accelerate launch ``processes`` processes of the worker (as 1 machine), or 2 machines of 1 each."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    port = free_port()
    args = [str(WORKER), *shlex.split(f"{ARGS} {extra}"), "--output-dir", str(out)]
    if machines == 1:
        cmds = [[str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(processes),
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


def ranks(out: pathlib.Path, processes: int = 2) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(processes)]


def assert_identical(a: dict, b: dict) -> None:
    for key in ("masks", "fired", "weights"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} of {name} differ across ranks"


def test_set_two_processes_train_one_sparse_network(tmp_path):
    """SET (random growth), replicated: the draws are rank 0's, broadcast."""
    launch(tmp_path, "--sharding ddp --growth random")
    r0, r1 = ranks(tmp_path)
    assert_identical(r0, r1)
    assert r0["updates"] == 8 and r0["summary"]["final_itop_rate"] > 0.11  # explored beyond 10%
    assert r0["shards"] == {}


# ---------------------------------------------------------------------------------------------
# Every ZeRO stage: RigL-ITOP and GraNet, identical on every rank and equal to DDP's run; GraNet
# resumed bit-exact from a checkpoint of its own stage, and in other stages and world sizes.

STAGES = {"ddp": 2, "zero1": 2, "zero2": 2, "zero3": 2, "hsdp": 4}  # processes; hsdp is 2 x 2
RIGL = "--growth gradient"
GRANET = ("--method GraNet --init-density 0.5 --final-density 0.1 --init-prune-epoch 0 "
          "--final-prune-epoch 2 --growth gradient")


def stage_args(stage: str) -> str:
    return f"--sharding {stage}" + (" --shard-group-size 2" if stage == "hsdp" else "")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs by (stage, method, kind), launched once per module when a test first asks:
    kind "full" (uninterrupted) or "part" (stopped at step 30, its checkpoint kept)."""
    root, done = tmp_path_factory.mktemp("stages"), {}

    def get(stage: str, method: str, kind: str = "full", processes: int | None = None) -> pathlib.Path:
        n = processes or STAGES[stage]
        key = (stage, method, kind, n)
        if key not in done:
            out = root / f"{stage}-{'granet' if 'GraNet' in method else 'rigl'}-{kind}-{n}"
            launch(out, f"{stage_args(stage)} {method}" + (" --max-steps 30" if kind == "part" else ""),
                   processes=n)
            done[key] = out
        return done[key]
    return get


# digits-mlp: fc1 256x64, fc2 256x256, fc3 10x256. FSDP2 splits rows into chunks of
# ceil(rows / 2): 128 + 128, 128 + 128, 5 + 5 rows; a rank holds a mask and an explored union
# (1 byte per weight each) of its rows.
SPARSE_FULL_BYTES = 2 * (256 * 64 + 256 * 256 + 10 * 256)
SPARSE_SHARD_BYTES = 2 * (128 * 64 + 128 * 256 + 5 * 256)


def assert_sparse_run(rs: list[dict], stage: str, steps: int, exact_nnz: bool) -> None:
    """Every rank holds the same masks, explored union and weights; the density is exact; each
    masked weight is zero; sharded stages really hold half of every large parameter and half of
    the sparse state (measured: the bytes of the tensors each rank keeps)."""
    for r in rs[1:]:
        assert_identical(rs[0], r)
    r0 = rs[0]
    assert r0["summary"]["step"] == steps and r0["summary"]["sharding"] == stage
    masked = sum(m.numel() for m in r0["masks"].values())
    nnz = sum(int(m.sum()) for m in r0["masks"].values())
    if exact_nnz:  # GraNet's global pruning hits the count exactly
        assert nnz == round(0.1 * masked)
    else:  # RigL: ERK's per-layer rounding, at most one weight per layer
        assert abs(nnz - 0.1 * masked) <= len(r0["masks"])
    for name, m in r0["masks"].items():
        assert not r0["weights"][name][~m].any(), f"masked weights of {name} not zero"
    for r in rs:
        assert r["sparse_state_full_bytes"] == SPARSE_FULL_BYTES
    if stage in ("zero2", "zero3", "hsdp"):  # a shard group of 2: each rank holds half of fc2
        assert r0["shards"]["fc2.weight"] == (32768, 65536), r0["shards"]
        assert all(r["sparse_state_bytes"] == SPARSE_SHARD_BYTES for r in rs)
    else:
        assert r0["shards"] == {}
        assert all(r["sparse_state_bytes"] == SPARSE_FULL_BYTES for r in rs)


def assert_sparse_checkpoint_is_sharded(run: pathlib.Path, stage: str) -> None:
    """Sharded stages write each rank's rows of the row-packed masks and explored union and no
    rank the whole (fc1 rows of 64 weights = 8 bytes, fc2 and fc3 rows of 256 = 32 bytes; 128,
    128 and 5 rows per rank); hsdp's second replica writes no block; ddp and zero1 write the
    whole state once."""
    checkpoint = max((run / "checkpoints").glob("step-*"))
    if stage not in FSDP_STAGES:
        assert (checkpoint / "sparse_state.safetensors").is_file()
        assert not list(checkpoint.glob("sparse_state-shard-*"))
        return
    assert not (checkpoint / "sparse_state.json").exists()
    rows = {"fc1.weight": (128, 8), "fc2.weight": (128, 32), "fc3.weight": (5, 32)}
    for rank in range(STAGES[stage]):
        path = checkpoint / f"sparse_state-shard-{rank}.safetensors"
        if rank >= 2:  # hsdp's replica of ranks 0 and 1
            assert (checkpoint / f"sparse_state-shard-{rank}.json").is_file() and not path.exists()
            continue
        held = {k: tuple(v.shape) for k, v in load_file(str(path)).items()}
        assert held == {f"state/{key}/{n}/bits": shape for key in ("masks", "fired") for n, shape in rows.items()}


def assert_same_network(a: dict, b: dict, weights_exact: bool = True) -> None:
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), f"masks of {name} differ"
        assert torch.equal(a["fired"][name], b["fired"][name]), f"explored unions of {name} differ"
    for name in a["weights"]:
        if weights_exact:
            assert torch.equal(a["weights"][name], b["weights"][name]), f"weights of {name} differ"
        else:  # another reduction order: float rounding only
            torch.testing.assert_close(a["weights"][name], b["weights"][name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_trains_rigl_itop_as_ddp_does(runs, stage):
    """With 2 processes each stage is DDP's run bit for bit (the same sums in another place);
    hsdp (2 x 2) has DDP's 4-process masks exactly and its weights up to reduction rounding."""
    n = STAGES[stage]
    rs = ranks(runs(stage, RIGL), n)
    assert_sparse_run(rs, stage, steps=66 if n == 2 else 33, exact_nnz=False)
    assert rs[0]["updates"] == (8 if n == 2 else 4)
    assert_same_network(rs[0], ranks(runs("ddp", RIGL, processes=n), n)[0], weights_exact=n == 2)


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_trains_granet_and_resumes_bit_exact(runs, stage, tmp_path):
    n = STAGES[stage]
    full = ranks(runs(stage, GRANET), n)
    assert_sparse_run(full, stage, steps=66 if n == 2 else 33, exact_nnz=True)
    if n == 2:
        assert_same_network(full[0], ranks(runs("ddp", GRANET), 2)[0])
    part = tmp_path / "part"
    shutil.copytree(runs(stage, GRANET, "part"), part)
    assert_sparse_checkpoint_is_sharded(part, stage)
    launch(part, f"{stage_args(stage)} {GRANET} --resume auto", processes=n)
    resumed = ranks(part, n)
    for r in resumed[1:]:
        assert_identical(resumed[0], r)
    assert_same_network(resumed[0], full[0])


# A checkpoint of one stage and world size resumes in another: the full-state layout holds
# the masks, explored union, weights and optimizer state whatever wrote it.
@pytest.mark.parametrize("saved, resumed", [("zero3", "ddp"), ("zero1", "zero2"), ("ddp", "zero1")])
def test_resume_in_another_stage_is_bit_exact(runs, tmp_path, saved, resumed):
    """Same world size and batch: every 2-process stage computes DDP's run, so the resumed run
    must end exactly where the uninterrupted DDP run did."""
    part = tmp_path / "part"
    shutil.copytree(runs(saved, GRANET, "part"), part)
    launch(part, f"{stage_args(resumed)} {GRANET} --resume auto")
    rs = ranks(part)
    assert_identical(rs[0], rs[1])
    assert rs[0]["summary"]["sharding"] == resumed
    assert_same_network(rs[0], ranks(runs("ddp", GRANET), 2)[0])


@pytest.mark.parametrize("saved, resumed, processes", [("hsdp", "zero3", 2), ("zero3", "zero3", 3)])
def test_resume_in_another_world_size(runs, tmp_path, saved, resumed, processes):
    """4 -> 2 processes (hsdp -> zero3) and 2 -> 3 (a rank holding no row of a small layer):
    the masks and explored union at resume are the checkpoint's, so the run continues from its
    connectivity and ends at the exact density with every rank identical."""
    from itop_dist.state import saved_masks
    from launcher.checkpoint import read_state

    part = tmp_path / "part"
    shutil.copytree(runs(saved, GRANET, "part"), part)
    checkpoint = max((part / "checkpoints").glob("step-*"))  # the newest, which --resume auto takes
    sd = read_state(checkpoint, "sparse_state")["state"]
    saved_fired = saved_masks(sd["fired"])
    launch(part, f"{stage_args(resumed)} {GRANET} --resume auto", processes=processes)
    rs = ranks(part, processes)
    for r in rs[1:]:
        assert_identical(rs[0], r)
    assert rs[0]["summary"]["world_size"] == processes and rs[0]["summary"]["step"] > sd["step"] == 30
    masked = sum(m.numel() for m in rs[0]["masks"].values())
    assert sum(int(m.sum()) for m in rs[0]["masks"].values()) == round(0.1 * masked)
    for name, fired in saved_fired.items():  # the explored union went on from the checkpoint's
        assert not (fired & ~rs[0]["fired"][name]).any(), name
    assert rs[0]["updates"] > sd["updates"]


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


@pytest.mark.parametrize("sharding", ["ddp", "zero3"])
def test_gradient_accumulation_across_ranks(tmp_path, sharding):
    """Gradients sync on the last micro-batch only; the mask hook sees the accumulated one."""
    launch(tmp_path, f"--sharding {sharding} --growth gradient --grad-accum-steps 2")
    r0, r1 = ranks(tmp_path)
    assert_identical(r0, r1)
    assert r0["summary"]["step"] == 33 and r0["updates"] == 4  # 11 steps per epoch


@pytest.mark.parametrize("config, stage", [("fsdp", "zero3"), ("zero2", "zero2")])
def test_accelerate_config_files(tmp_path, config, stage):
    """The shipped configs load; the FSDP ones select their ZeRO stage through Accelerate's own
    launcher (which passes fsdp_reshard_after_forward to the processes)."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = REPO / "launcher" / "accelerate"
    kinds = {p.stem: load_config_from_file(str(p)) for p in folder.glob("*.yaml")}
    assert set(kinds) == {"single_gpu", "multi_gpu", "multi_node", "fsdp", "zero2"}
    assert kinds["single_gpu"].num_processes == 1
    assert kinds["multi_node"].num_machines == 2 and kinds["multi_node"].distributed_type == "MULTI_GPU"
    assert kinds[config].distributed_type == "FSDP"
    # The config, as a user would adapt it for 2 CPU processes.
    text = (folder / f"{config}.yaml").read_text()
    cpu = tmp_path / "cpu.yaml"
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
    assert r0["summary"]["sharding"] == stage and r0["shards"]["fc2.weight"] == (32768, 65536)
    assert_identical(r0, r1)
    # A flag that contradicts the config is refused, not overridden either way.
    proc = subprocess.run([str(ACCELERATE), "launch", "--config_file", str(cpu), "--main_process_port",
                           str(free_port()), "-m", "launcher.train", *shlex.split(ARGS), "--sharding", "ddp",
                           "--output-dir", str(tmp_path / "refused")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0
    assert (f"itop-train: error: --sharding ddp: the Accelerate config asks for FSDP ({stage}); drop "
            "--sharding, or launch with a config without distributed_type FSDP") in proc.stderr


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


# ---------------------------------------------------------------------------------------------
# A timm ViT in every stage: transformer blocks as FSDP units (models.timm_models.fsdp_units).

VIT = ("--model timm/vit_tiny_patch16_224 --model-kwargs img_size=8 patch_size=2 in_chans=1 depth=2 "
       "embed_dim=32 num_heads=2 --optimizer adamw --lr 0.001 --growth gradient")


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_timm_vit_trains_one_sparse_network_in_every_stage(tmp_path, stage):
    """RigL-ITOP on a 2-block ViT (32 wide, 2 heads, 17 tokens of the digits): every rank ends
    with the same masks, explored union and weights, at ERK's exact counts; sharded stages hold
    half of each block's qkv rows (96 of them: 48 per rank of a shard group of 2)."""
    launch(tmp_path, f"{stage_args(stage)} {VIT}", processes=STAGES[stage])
    rs = ranks(tmp_path, STAGES[stage])
    for r in rs[1:]:
        assert_identical(rs[0], r)
    r0 = rs[0]
    assert r0["updates"] == r0["summary"]["step"] // 8 >= 4 and r0["summary"]["sharding"] == stage
    assert list(r0["masks"]) == ["patch_embed.proj.weight", *(f"blocks.{i}.{n}" for i in range(2) for n in (
        "attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")), "head.weight"]
    shapes = {n: tuple(m.shape) for n, m in r0["masks"].items()}
    expected = {n: exact_count(d, math.prod(shapes[n])) for n, d in erk_densities(shapes, 0.1).items()}
    # RigL moves weights within a layer: each layer keeps its initial count exactly
    assert {n: int(m.sum()) for n, m in r0["masks"].items()} == expected
    for name, m in r0["masks"].items():
        assert not r0["weights"][name][~m].any(), f"masked weights of {name} not zero"
    if stage in FSDP_STAGES:
        assert r0["shards"]["blocks.0.attn.qkv.weight"] == (48 * 32, 96 * 32), r0["shards"]
    else:
        assert r0["shards"] == {}
