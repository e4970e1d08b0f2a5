"""Checkpoint cost on ResNet-50 (ImageNet shapes, ERK density 0.1, SGD with momentum).

Times, side by side in one run (one process, the CPU, the run folder on this machine's disk):
  * writing one checkpoint (model + optimizer + sparse state + the small pieces, manifest with
    SHA-256 of every file, fsync, atomic rename);
  * verifying it against its manifest (what every resume does first);
  * loading it (safetensors + JSON into the model, optimizer and sparsifier).
Prints each time, the bytes written and verification as a share of a write.
Usage: python benchmarks/bench_checkpoint.py [--repeats 3] [--dir /tmp/ckpt-bench]
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import shutil
import tempfile

import torch

import models
from bench_masks import timed  # median after one warm-up call
from itop_dist import SparseConfig, Sparsifier
from launcher.checkpoint import Checkpointer, RNGState, verify
from launcher.parallel import ModelState, OptimizerState


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    model = models.create_model("ResNet-50", "imagenet", num_classes=1000)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, optimizer, SparseConfig(density=0.1, sparse_init="ERK"), total_steps=1000)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()  # creates the momentum buffers
    ck = Checkpointer(root, keep_last=1)
    ck.register("model", ModelState(model))
    ck.register("optimizer", OptimizerState(model, optimizer))
    ck.register("sparse_state", sparsifier, "--sparse")
    ck.register("rng_state", RNGState(), per_rank=True)
    steps = iter(range(1, 10_000))
    last = {}

    def save():
        last["path"] = ck.save(next(steps), {"step": 0}, is_best=False)

    write = timed(save, args.repeats)
    path = last["path"]
    size = sum(p.stat().st_size for p in path.iterdir())
    check = timed(lambda: verify(path), args.repeats)
    load = timed(lambda: ck.load(path), args.repeats)
    print(f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {args.repeats}, {size / 2**20:.1f} MiB per checkpoint")
    print(f"write (incl. manifest SHA-256, fsync, rename): {write * 1e3:8.0f} ms")
    print(f"verify against the manifest:                   {check * 1e3:8.0f} ms  "
          f"({check / write:.2f}x a write, {size / 2**20 / check:.0f} MiB/s)")
    print(f"load (after verify):                           {load * 1e3:8.0f} ms")
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
