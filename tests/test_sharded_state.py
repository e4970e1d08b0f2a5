"""The sparse state sharded like the parameters under FSDP2 (docs/algorithms.md §12.3): each rank
holds its shard of every mask and explored union, the decisions are those of the unsharded run,
a corrupted shard is caught. Two processes with real ``accelerate launch`` on gloo. The
decisions equal the replicated run's and each rank holds half of the state: the stage matrix of
test_distributed.py; the single-process tests of the sharded path: test_sparsifier.py."""

from __future__ import annotations

import pytest

from test_distributed import launch

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
