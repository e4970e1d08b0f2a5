"""One full distributed mask update on ResNet-50 (ERK 0.2, RigL): gather, decide, broadcast, apply.

Run under any launcher that sets the torch.distributed environment, e.g. on CPUs::

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 benchmarks/bench_dist_update.py
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 benchmarks/bench_dist_update.py --sharding fsdp

Rank 0 prints the median time of a whole ``Sparsifier.update()`` (with its two mask checks),
the parts (rank 0's decision alone, the mask broadcast alone) and the bytes broadcast per update
against float32 masks (what a float-mask broadcast would send).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import models
from itop_dist import SparseConfig, Sparsifier, collectives
from itop_dist.methods import UpdateInputs
from itop_dist.sparsifier import full_tensor
from launcher.parallel import apply_fsdp


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sharding", choices=["ddp", "fsdp"], default="ddp")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = models.create_model("resnet50", "imagenet", num_classes=1000).to(device)
    if args.sharding == "fsdp":
        model = apply_fsdp(model, "no", models.model_fsdp_units("resnet50", "imagenet")(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = Sparsifier(model, optimizer, SparseConfig(density=0.2, growth="gradient"), total_steps=1000)
    x = torch.randn(2, 3, 224, 224, device=device)
    torch.nn.functional.cross_entropy(model(x), torch.zeros(2, dtype=torch.long, device=device)).backward()
    # Replicated runs average gradients across ranks (DDP); here every rank has the same batch.

    whole = timed(sp.update, args.repeats)
    weights = {n: full_tensor(p) for n, p in sp.params.items()}
    grads = {n: full_tensor(p.grad) for n, p in sp.params.items()}
    inputs = UpdateInputs(weights, dict(sp.masks), grads, {n: None for n in sp.params}, 100, 1)
    decide = timed(lambda: sp.method.update(inputs) if rank == 0 else None, args.repeats)
    bcast = timed(lambda: collectives.broadcast_masks(sp.masks if rank == 0 else None, sp.shapes), args.repeats)
    gather = timed(lambda: [full_tensor(p) for p in sp.params.values()], args.repeats)
    sent = sum(collectives.encoded_size(m.numel(), int(m.sum())) for m in sp.masks.values())
    sent += 8 * len(sp.masks)  # the per-layer counts
    as_float = 4 * sum(m.numel() for m in sp.masks.values())
    if rank == 0:
        print(f"# ResNet-50, ERK density {sp.density:.4f}, RigL update, {world} processes, "
              f"{args.sharding}, {device.type}, torch {torch.__version__}, median of {args.repeats}")
        print(f"whole update (check, gather, decide, broadcast, apply, check): {whole * 1e3:8.1f} ms")
        print(f"  rank 0 decision alone (prune + regrow, 54 layers):          {decide * 1e3:8.1f} ms")
        print(f"  mask broadcast alone:                                        {bcast * 1e3:8.1f} ms")
        print(f"  gathering full weights (FSDP all-gather; DDP: nothing):      {gather * 1e3:8.1f} ms")
        print(f"bytes broadcast per update: {sent / 2**20:.2f} MiB vs {as_float / 2**20:.2f} MiB as "
              f"float32 masks ({as_float / sent:.1f}x less)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
