"""Mask machinery on ResNet-50 (ImageNet shapes, ERK density 0.2): ours vs the original code.

Times, side by side in one run:
  * one mask application (weights and SGD momentum), ours (in-place multiply by a cached float
    mask; also the bool mask and torch._foreach_mul_) vs the original's per-tensor loop of
    float-mask products that create new tensors;
  * one full RigL update (magnitude prune + gradient regrow, all 54 layers), ours (top-k with a
    deterministic tie-break) vs the original's sort-based update;
  * the bytes of the masks as float32, bool and bit-packed;
  * one dense training step (forward + backward + SGD) for scale.
Prints each time and the ratios. Usage: python benchmarks/bench_masks.py [--batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch

import models
from itop_dist import SparseConfig, Sparsifier
from itop_dist.methods import UpdateInputs, prune_and_regrow
from itop_dist.topology import pack_bits


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def reference_apply(params, masks, optimizer) -> None:
    """The original apply_mask: new tensors for weights and momentum, one layer at a time."""
    for name, p in params.items():
        p.data = p.data * masks[name]
        state = optimizer.state[p]
        if "momentum_buffer" in state:
            state["momentum_buffer"] = state["momentum_buffer"] * masks[name]


def reference_rigl_update(weights, masks, grads, rate: float) -> dict[str, torch.Tensor]:
    """The original funcs-core magnitude death + gradient growth, with full sorts."""
    new_masks = {}
    for name, w in weights.items():
        mask = masks[name].clone()
        nnz = int(mask.sum())
        num_remove = math.ceil(rate * nnz)
        k = math.ceil(mask.numel() - nnz + num_remove)
        _, idx = torch.sort(torch.abs(w.data.view(-1)))
        mask.view(-1)[idx[:k]] = 0.0
        regrow = int(nnz - mask.sum())
        grad = grads[name] * (mask == 0).float()
        _, idx = torch.sort(torch.abs(grad).flatten(), descending=True)
        mask.view(-1)[idx[:regrow]] = 1.0
        new_masks[name] = mask
    return new_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = models.create_model("resnet50", "imagenet", num_classes=1000).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sparsifier = Sparsifier(model, optimizer, SparseConfig(density=0.2, growth="gradient"), 1000)
    x = torch.randn(args.batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def dense_step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step_s = timed(dense_step, max(2, args.repeats // 2))  # also fills grads and momentum
    params = sparsifier.params
    masks_bool = sparsifier.masks
    masks_float = {n: m.float() for n, m in masks_bool.items()}

    def sync(fn):
        def run():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return run

    def ours(mode: str):
        """apply_masks of a Sparsifier with ``apply_mode`` ``mode`` (the same seed: the same masks)."""
        return Sparsifier(model, optimizer, SparseConfig(density=0.2, growth="gradient", apply_mode=mode),
                          1000).apply_masks

    apply = {"reference (new tensors, float masks)":
             timed(sync(lambda: reference_apply(params, masks_float, optimizer)), args.repeats)}
    for mode, label in (("float", "in-place, cached float mask"), ("bool", "in-place, bool mask"),
                        ("foreach", "_foreach_mul_, float masks")):
        apply[f"ours: {label}"] = timed(sync(ours(mode)), args.repeats)

    weights = {n: p.detach() for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    inputs = UpdateInputs(weights, dict(masks_bool), grads, {n: None for n in params}, 100, 1)
    update = {
        "reference (sort-based)": timed(sync(lambda: reference_rigl_update(weights, masks_float, grads, 0.5)), args.repeats),
        "ours (top-k)": timed(sync(lambda: prune_and_regrow(inputs, 0.5, "magnitude", "gradient")), args.repeats),
    }

    nbytes = {
        "float32": sum(m.numel() * 4 for m in masks_bool.values()),
        "bool": sum(m.numel() for m in masks_bool.values()),
        "bit-packed": sum(pack_bits(m.cpu()).numel() for m in masks_bool.values()),
    }

    print(f"# ResNet-50 (ImageNet shapes), ERK density {sparsifier.density:.4f}, {len(params)} masked tensors")
    print(f"# device {device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}, median of {args.repeats}")
    print(f"dense training step, batch {args.batch} at 224: {step_s * 1e3:9.1f} ms")
    ref = apply["reference (new tensors, float masks)"]
    print("mask application (weights + momentum):")
    for k, v in apply.items():
        print(f"  {k:<40} {v * 1e3:8.2f} ms  reference/this {ref / v:5.2f}x  "
              f"= {v / step_s * 100:5.2f}% of a dense step")
    ref = update["reference (sort-based)"]
    print("one RigL update (prune + gradient regrow, all layers):")
    for k, v in update.items():
        print(f"  {k:<40} {v * 1e3:8.1f} ms  reference/this {ref / v:5.2f}x")
    print("mask bytes:")
    for k, v in nbytes.items():
        print(f"  {k:<12} {v / 2**20:8.2f} MiB  float32/this {nbytes['float32'] / v:5.1f}x")


if __name__ == "__main__":
    main()
