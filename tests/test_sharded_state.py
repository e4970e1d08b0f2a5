"""The sparse state sharded like the parameters under FSDP2 (docs/algorithms.md §12.3): each rank
holds its shard of every mask and explored union, the decisions are those of the unsharded run,
a corrupted shard is caught. Two processes with real ``accelerate launch`` on gloo (the
single-process tests of the sharded path are in test_sparsifier.py)."""

from __future__ import annotations

import pytest
import torch

from test_distributed import assert_identical, launch, ranks

GRANET = ("--method GraNet --init-density 0.5 --final-density 0.1 --init-prune-epoch 0 "
          "--final-prune-epoch 2 --growth gradient")
RUNS = {"rigl": "--growth gradient", "granet": GRANET}
# digits-mlp: fc1 256x64, fc2 256x256, fc3 10x256. FSDP2 splits rows into chunks of
# ceil(rows / 2): 128 + 128, 128 + 128, 5 + 5 rows; a rank holds a mask and an explored union
# (1 byte per weight each) of its rows.
FULL_BYTES = 2 * (256 * 64 + 256 * 256 + 10 * 256)
SHARD_BYTES = 2 * (128 * 64 + 128 * 256 + 5 * 256)

pytestmark = [pytest.mark.slow, pytest.mark.dist]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The two ranks' outputs of a run by (method key, sharding), launched once per module."""
    done: dict[tuple[str, str], list[dict]] = {}

    def get(method: str, sharding: str) -> list[dict]:
        if (method, sharding) not in done:
            out = tmp_path_factory.mktemp(f"{method}-{sharding}")
            launch(out, f"--sharding {sharding} {RUNS[method]}")
            done[method, sharding] = ranks(out)
        return done[method, sharding]

    return get


@pytest.mark.parametrize("method", sorted(RUNS))
def test_sharded_run_takes_the_decisions_of_the_replicated_run(run, method):
    r0, r1 = run(method, "zero3")
    assert_identical(r0, r1)
    d0, _ = run(method, "ddp")
    for key in ("masks", "fired"):
        assert r0[key].keys() == d0[key].keys()
        for name in d0[key]:
            assert torch.equal(r0[key][name], d0[key][name]), f"{key} of {name}: zero3 differs from ddp"
    masked = sum(m.numel() for m in r0["masks"].values())
    nnz = sum(int(m.sum()) for m in r0["masks"].values())
    if method == "granet":  # the global cut keeps the exact count
        assert nnz == round(0.1 * masked)
    else:  # each layer keeps its exact initial count
        assert nnz == sum(int(m.sum()) for m in d0["masks"].values())
        assert abs(nnz - 0.1 * masked) <= len(r0["masks"])
    assert r0["summary"]["final_itop_rate"] == d0["summary"]["final_itop_rate"]
    for name, m in r0["masks"].items():
        assert not r0["weights"][name][~m].any(), f"masked weights of {name} not zero"


def test_each_rank_holds_its_shard_of_the_sparse_state(run):
    for r in run("rigl", "zero3"):
        assert {n: tuple(m.shape) for n, m in r["masks"].items()} == {
            "fc1.weight": (256, 64), "fc2.weight": (256, 256), "fc3.weight": (10, 256)}
        assert r["sparse_state_full_bytes"] == FULL_BYTES
        assert r["sparse_state_bytes"] == SHARD_BYTES
    for r in run("rigl", "ddp"):  # replicated: every rank holds the whole state, as before
        assert r["sparse_state_bytes"] == r["sparse_state_full_bytes"] == FULL_BYTES


@pytest.mark.parametrize("sharding", ["zero3", "hsdp --shard-group-size 1"], ids=["zero3", "hsdp-replicas"])
def test_a_corrupted_mask_shard_stops_every_rank_at_the_next_update(tmp_path, sharding):
    """zero3: rank 1 alone holds its rows of fc2; hsdp with shard groups of 1: both ranks hold
    all of it as replicas. Either way rank 1 is named."""
    launch(tmp_path, f"--sharding {sharding} --growth random --corrupt-at 11", expect_ok=False)
    for r in range(2):  # a bit of rank 1's block of fc2 flipped before step 11
        err = (tmp_path / f"rank{r}.err").read_text()
        assert err.startswith("MaskMismatchError: masks differ across ranks: first differing layer "
                              "'fc2.weight' on rank(s) [1]"), err
    assert not (tmp_path / "rank0.pt").exists()
