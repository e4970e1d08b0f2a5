"""The sparse state sharded like the parameters under FSDP2 (docs/algorithms.md §12.3): each rank
holds its shard of every mask and explored union, the decisions are those of the unsharded run,
a corrupted shard is caught, an update streams through rank 0 one layer at a time. Two
processes with real ``accelerate launch`` on gloo. The decisions equal the replicated run's and
each rank holds half of the state: the stage matrix of test_distributed.py; the single-process
tests of the sharded path: test_sparsifier.py."""

from __future__ import annotations

import pytest

from test_distributed import GRANET, RIGL, launch, ranks

pytestmark = [pytest.mark.slow, pytest.mark.dist]


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


# digits-mlp's masked layers (fc1 256x64, fc2 256x256, fc3 10x256) in weights, and FSDP2's
# blocks over 2 ranks: 128 + 128, 128 + 128 and 5 + 5 rows.
LAYERS = {"fc1.weight": 256 * 64, "fc2.weight": 256 * 256, "fc3.weight": 10 * 256}
# Per weight of the layer being decided, rank 0 holds: the weight and the gradient (float32,
# 4 bytes each), the mask and explored union gathered, the new mask, the grown positions and
# the new explored union (bool, 1 byte each). The survey passes of GraNet's global pruning hold
# 5 bytes per weight (weight and mask), less.
DECIDING_BYTES_PER_WEIGHT = 4 + 4 + 1 + 1 + 1 + 1 + 1
# What rank 0 receives in one update: rank 1's half of each layer's weight, gradient, mask and
# explored union (4 + 4 + 1 + 1 bytes a weight), and 48 bytes in each of the two checks'
# all-gathers (2 x 3 int64 checksums) and the counts' all-reduce (2 x 3 int64, a ring of 2).
RECEIVED_BY_RANK0 = sum(n // 2 * (4 + 4 + 1 + 1) for n in LAYERS.values()) + 3 * 48


@pytest.mark.parametrize("method", [RIGL, f"{GRANET} --max-steps 30"], ids=["rigl", "granet"])
def test_a_zero3_update_holds_one_layer_on_rank0_not_the_model(tmp_path, method):
    """The update streams: rank 0's peak of full-layer tensors is exactly the largest layer's
    (fc2) inputs and outputs, not the sum over the layers that it held when it gathered the
    whole model first; the other rank holds none. Rank 0 receives one copy of each block of
    what the method needs, and nothing else but the checks' few bytes. GraNet's last update
    (step 24) is inside its pruning window, so its global pruning surveys the layers twice."""
    launch(tmp_path, f"--sharding zero3 {method}")
    r0, r1 = (r["update_cost"] for r in ranks(tmp_path))
    one_layer = DECIDING_BYTES_PER_WEIGHT * max(LAYERS.values())
    whole_model = DECIDING_BYTES_PER_WEIGHT * sum(LAYERS.values())
    assert r0["held_bytes"] == one_layer == 851_968 < whole_model == 1_098_240
    assert r1["held_bytes"] == 0
    if method == RIGL:  # no survey pass
        assert r0["received_bytes"] == RECEIVED_BY_RANK0 == r1["sent_bytes"]
    else:  # and two survey passes of weight and mask (4 + 1 bytes a weight)
        surveys = 2 * sum(n // 2 * (4 + 1) for n in LAYERS.values())
        assert r0["received_bytes"] == RECEIVED_BY_RANK0 + surveys == r1["sent_bytes"]
