"""Dense vs sparse training steps, side by side: same model, same batch, same optimizer.

A sparse step is the dense step plus ``Sparsifier.step()`` (masks multiplied into weights and
momentum); a mask update (prune + regrow) happens every ``--update-frequency`` steps and is
timed separately (with the step after it), then amortised. With ``--compile`` the same model
compiled in place (inductor) is timed too, dense and sparse, and its mask update with the step
after it, where a recompilation would show. Every kind of step takes its turn in each round so
that all see the same machine state. Prints the step times and the ratios.

    python benchmarks/bench_train_step.py --model vgg-c --data cifar10 --batch 128
    python benchmarks/bench_train_step.py --model ResNet-18 --batch 32 --steps 5 --compile
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
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile'd models (in place, inductor): compiled vs eager")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = DATASETS[args.data].input_shape
    classes = DATASETS[args.data].num_classes
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    def build(sparse: bool, compiled: bool):
        torch.manual_seed(0)
        model = models.create_model(args.model, args.data, num_classes=classes).to(device, memory_format=fmt)
        if compiled:
            model.compile()  # in place, as itop-train --compile does
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

    def update_then_step(model, opt, sp) -> tuple[float, float]:
        """(one mask update, the step after it): a recompiling update shows in the step."""
        t0 = time.perf_counter()
        sp.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, step(model, opt, sp)

    kinds = {"dense": (False, False), "sparse": (True, False)}
    if args.compile:
        kinds |= {"compiled dense": (False, True), "compiled sparse": (True, True)}
    runs = {kind: build(*how) for kind, how in kinds.items()}
    warm = {}
    for kind, run in runs.items():  # warm-up; a compiled model compiles in its first step
        t0 = time.perf_counter()
        step(*run), step(*run)
        warm[kind] = time.perf_counter() - t0
    times = {kind: [] for kind in runs}
    for _ in range(args.steps):  # every kind in turn, so that all see the same machine state
        for kind, run in runs.items():
            times[kind].append(step(*run))
    med = {kind: statistics.median(t) for kind, t in times.items()}
    update = {kind: update_then_step(*runs[kind]) for kind in runs if "sparse" in kind}

    sp = runs["sparse"][2]
    d, s = med["dense"], med["sparse"]
    t_update = update["sparse"][0]
    amortised = s + t_update / args.update_frequency
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"# {args.model} on {args.data}-shaped input, batch {args.batch}, density {sp.density:.4f}, "
          f"growth {args.growth}, {'bf16' if args.bf16 else 'fp32'}"
          f"{', channels_last' if args.channels_last else ''}; {name}; torch {torch.__version__}; "
          f"median of {args.steps}")
    for kind in runs:
        print(f"{kind + ' step':<30} {med[kind] * 1e3:9.2f} ms   {args.batch / med[kind]:9.1f} samples/s"
              f"   (first 2 steps: {warm[kind]:.1f} s)")
    print(f"one mask update                {t_update * 1e3:9.2f} ms")
    print(f"sparse step + update/{args.update_frequency:<6}   {amortised * 1e3:9.2f} ms")
    print(f"ratio sparse/dense: {s / d:.3f} (masking only), {amortised / d:.3f} (with updates)")
    if args.compile:
        cd, cs = med["compiled dense"], med["compiled sparse"]
        print(f"ratio compiled/eager: dense {cd / d:.3f}, sparse {cs / s:.3f}; compiled sparse/dense {cs / cd:.3f}")
        for kind, median in (("sparse", s), ("compiled sparse", cs)):
            up, after = update[kind]
            print(f"{kind}: mask update {up * 1e3:.2f} ms + next step {after * 1e3:.2f} ms = "
                  f"{(up + after) * 1e3:.2f} ms; next step / median step {after / median:.3f}")
        print("(a recompiling update would make the compiled next step cost about its first steps)")

if __name__ == "__main__":
    main()
