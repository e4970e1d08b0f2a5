"""Dense vs sparse training steps, side by side: same model, same batch, same optimizer.

A sparse step is the dense step plus ``Sparsifier.step()`` (masks multiplied into weights and
momentum); a mask update (prune + regrow) happens every ``--update-frequency`` steps and is
timed separately, then amortised. Dense and sparse steps alternate so that both see the same
machine state. Prints the step times and the sparse/dense ratio.

    python benchmarks/bench_train_step.py --model vgg-c --data cifar10 --batch 128
    python benchmarks/bench_train_step.py --model resnet50 --data imagenet --batch 256 --bf16   # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import models
from data_pipelines import DATASETS
from itop_dist import SparseConfig, Sparsifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vgg-c")
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--growth", default="gradient")
    parser.add_argument("--update-frequency", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = DATASETS[args.data].input_shape
    classes = DATASETS[args.data].num_classes
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    def build(sparse: bool):
        torch.manual_seed(0)
        model = models.create_model(args.model, args.data, num_classes=classes).to(device, memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        sp = (Sparsifier(model, opt, SparseConfig(density=args.density, growth=args.growth,
                                                  update_frequency=10**9), total_steps=10**6)
              if sparse else None)
        return model, opt, sp

    x = torch.randn(args.batch, *shape, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (args.batch,), device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16
                else contextlib.nullcontext())

    def step(model, opt, sp) -> float:
        t0 = time.perf_counter()
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sp is not None:
            sp.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    dense, sparse = build(False), build(True)
    for _ in range(2):  # warm-up
        step(*dense), step(*sparse)
    t_dense, t_sparse = [], []
    for _ in range(args.steps):
        t_dense.append(step(*dense))
        t_sparse.append(step(*sparse))
    sp = sparse[2]
    t0 = time.perf_counter()
    sp.update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_update = time.perf_counter() - t0

    d, s = statistics.median(t_dense), statistics.median(t_sparse)
    amortised = s + t_update / args.update_frequency
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"# {args.model} on {args.data}-shaped input, batch {args.batch}, density {sp.density:.4f}, "
          f"growth {args.growth}, {'bf16' if args.bf16 else 'fp32'}"
          f"{', channels_last' if args.channels_last else ''}; {name}; torch {torch.__version__}; "
          f"median of {args.steps}")
    print(f"dense step                     {d * 1e3:9.2f} ms   {args.batch / d:9.1f} samples/s")
    print(f"sparse step (masks applied)    {s * 1e3:9.2f} ms   {args.batch / s:9.1f} samples/s")
    print(f"one mask update                {t_update * 1e3:9.2f} ms")
    print(f"sparse step + update/{args.update_frequency:<6}   {amortised * 1e3:9.2f} ms")
    print(f"ratio sparse/dense: {s / d:.3f} (masking only), {amortised / d:.3f} (with updates)")


if __name__ == "__main__":
    main()
