"""Cost of the replica checks on ResNet-50 (ImageNet shapes, ERK density 0.1), one process.

The trainer compares per-layer checksums of the masks and the explored union across ranks every
``--log-interval`` steps (``Sparsifier.verify``: one all-gather of 2 x 54 int64 per check) and of
the weights at every evaluation. This times, side by side in one run: computing those checksums
(the all-gather of a few hundred bytes is not included: it is one small collective), against one
dense training step at batch 4 (224x224), and reports the share of a log interval of 50 steps.
Usage: python benchmarks/bench_replica_check.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform

import torch

import models
from bench_masks import timed  # median after one warm-up call
from itop_dist import SparseConfig, Sparsifier, collectives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = models.create_model("ResNet-50", "imagenet", num_classes=1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sp = Sparsifier(model, optimizer, SparseConfig(density=0.1, sparse_init="ERK"), total_steps=1000)
    x, y = torch.randn(4, 3, 224, 224), torch.randint(0, 1000, (4,))

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sp.apply_masks()

    masks = timed(lambda: (collectives.checksums(sp.state.masks), collectives.checksums(sp.state.fired)),
                  args.repeats)
    weights = timed(lambda: collectives.checksums(dict(model.named_parameters())), args.repeats)
    dense = timed(step, args.repeats)
    print(f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, median of {args.repeats}")
    print(f"dense training step (batch 4, 224):      {dense * 1e3:8.1f} ms")
    print(f"mask + explored-union checksums:          {masks * 1e3:8.1f} ms  "
          f"({masks / dense:.3f} of a step; {masks / (50 * dense) * 100:.2f}% of 50 steps)")
    print(f"weight checksums (every evaluation):      {weights * 1e3:8.1f} ms  ({weights / dense:.3f} of a step)")


if __name__ == "__main__":
    main()
