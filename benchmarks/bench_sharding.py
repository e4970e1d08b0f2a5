"""ZeRO stages on CPU processes (gloo): memory held per rank, step time and one mask update.

For each ``--sharding`` stage (ddp, zero1, zero2, zero3, hsdp) and each process count N, N
fresh processes (``torch.multiprocessing`` spawn, OMP_NUM_THREADS=1, one thread each) build the
model as the trainer does for that stage, with ``launcher.parallel``'s functions:
``shard_mesh`` + ``apply_fsdp`` with the family's FSDP units (zero2/zero3/hsdp), SGD with
momentum (``zero1_optimizer`` for zero1), torch's DDP wrapper for ddp/zero1 (what
``accelerator.prepare`` applies, default arguments), and an ``itop_dist.Sparsifier`` (ERK
density 0.1, RigL: gradient growth) on ``local_optimizer(optimizer)``. Each rank trains a few
steps on random data (batch 8 per rank) and then reports, per rank:

* bytes held, from the tensors it actually holds after the last step (gradients not yet
  zeroed): parameters (``DTensor.to_local()`` under FSDP2), gradients, optimizer state
  (the momentum buffers present in its local optimizer's state), the sparse state (masks and
  explored unions, ``sparsifier.state.masks`` / ``.fired``, as held) and, apart, the float
  mask multipliers the Sparsifier keeps for ``apply_mode="float"``;
* the peak RSS of the process (``getrusage``), and that peak less the RSS before the model was
  built (the torch runtime);
* the median step time (forward, backward, optimizer step, ``sparsifier.step()``);
* one ``sparsifier.update()`` right after a backward: its time, the bytes this rank sent in
  it (torch.distributed's collectives wrapped during the update, in the benchmark process
  only: what this rank puts on the wire; a broadcast's root sends its tensor to each of the
  other ranks, an all-reduce counts as a ring 2(n-1)/n of the tensor) and its peak extra
  memory (the RSS high-water mark reset before it, via /proc/self/clear_refs), and the
  Sparsifier's own record of it (``sparsifier.update_cost``, where the Sparsifier keeps one):
  the most bytes of full-layer tensors rank 0 held at once for the decision.

Memory columns are the largest over ranks; "sent r0" is rank 0 (the deciding rank), "sent
other" the largest of the other ranks. Usage::

    .venv/bin/python benchmarks/bench_sharding.py                      # resnet50 + wrn-28-10, N = 2, 4
    .venv/bin/python benchmarks/bench_sharding.py --quick              # digits-mlp smoke run
    .venv/bin/python benchmarks/bench_sharding.py --models wrn-28-10 --processes 4 --steps 2 \\
        --json out.json --plot docs/sharding_memory.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

STAGES_ALL = ("ddp", "zero1", "zero2", "zero3", "hsdp")
DATASET = {"digits-mlp": "digits"}  # otherwise cifar10 (32x32 inputs, 10 classes)
INPUT = {"digits": (64,), "cifar10": (3, 32, 32)}
MB = 2**20


# --- counting what a rank sends ----------------------------------------------------------
class SentCounter:
    """Wraps torch.distributed's tensor collectives (in ``torch.distributed`` and in
    ``distributed_c10d``, which the object collectives call) to count the bytes this rank
    sends while ``on``; a collective called from inside another is not counted twice."""

    NAMES = ("broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
             "all_reduce", "reduce", "gather", "scatter", "send", "isend", "all_to_all", "all_to_all_single")

    def __init__(self) -> None:
        self.on, self.depth, self.sent, self.calls = False, 0, 0, {}
        c10d = dist.distributed_c10d
        for name in self.NAMES:
            fn = getattr(c10d, name, None)
            if fn is None:
                continue
            wrapped = self._wrap(name, fn)
            for ns in (dist, c10d):
                if getattr(ns, name, None) is fn:
                    setattr(ns, name, wrapped)

    @staticmethod
    def _nbytes(t) -> int:
        if isinstance(t, torch.Tensor):
            return t.numel() * t.element_size()
        if isinstance(t, (list, tuple)):
            return sum(SentCounter._nbytes(x) for x in t)
        return 0

    def _bytes(self, name: str, args, kwargs) -> int:
        group = kwargs.get("group")
        n = dist.get_world_size(group)
        me = dist.get_rank()
        a = list(args) + [None] * 4

        def arg(i, key):
            return kwargs[key] if key in kwargs else a[i]

        if name == "broadcast":
            src = arg(1, "src")
            return self._nbytes(arg(0, "tensor")) * (n - 1) if src == me else 0
        if name == "all_gather":
            return self._nbytes(arg(1, "tensor")) * (n - 1)
        if name == "all_gather_into_tensor":
            return self._nbytes(arg(1, "input_tensor")) * (n - 1)
        if name == "all_reduce":
            return int(self._nbytes(arg(0, "tensor")) * 2 * (n - 1) / n)
        if name in ("reduce_scatter", "reduce_scatter_tensor"):
            return int(self._nbytes(arg(1, "input_list" if name == "reduce_scatter" else "input")) * (n - 1) / n)
        if name == "reduce":
            return self._nbytes(arg(0, "tensor")) if arg(1, "dst") != me else 0
        if name == "gather":
            return self._nbytes(arg(0, "tensor")) if arg(2, "dst") != me else 0
        if name == "scatter":
            if arg(2, "src") != me:
                return 0
            chunks = arg(1, "scatter_list") or []
            return self._nbytes(chunks) - self._nbytes(chunks[dist.get_rank(group)] if chunks else None)
        if name in ("send", "isend"):
            return self._nbytes(arg(0, "tensor"))
        if name in ("all_to_all", "all_to_all_single"):
            return int(self._nbytes(arg(1, "input_tensor_list" if name == "all_to_all" else "input")) * (n - 1) / n)
        return 0

    def _wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            if self.on and self.depth == 0:
                try:
                    self.sent += self._bytes(name, args, kwargs)
                except Exception:  # a signature not foreseen: count the call, not its bytes
                    pass
                self.calls[name] = self.calls.get(name, 0) + 1
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
        wrapper.__wrapped__ = fn
        return wrapper


# --- memory ------------------------------------------------------------------------------
def _local_bytes(t) -> int:
    if t is None:
        return 0
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- one process -------------------------------------------------------------------------
def worker(rank: int, world: int, port: int, name: str, stage: str, steps: int, batch: int,
           group_size: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import models
    from itop_dist import SparseConfig, Sparsifier
    from launcher.parallel import FSDP_STAGES, apply_fsdp, local_optimizer, shard_mesh, zero1_optimizer

    rss_start = _status_kb("VmRSS") / 1024
    dataset = DATASET.get(name, "cifar10")
    torch.manual_seed(0)
    model = models.create_model(name, dataset, num_classes=10)
    if stage in FSDP_STAGES:  # as Trainer._parallelize
        mesh = shard_mesh(stage, "cpu", world, group_size)
        model = apply_fsdp(model, "no", models.model_fsdp_units(name, dataset)(model), stage, mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if stage == "zero1":  # as Trainer._build_optimizer_and_schedule
        optimizer = zero1_optimizer(optimizer)
    if stage in ("ddp", "zero1"):  # accelerator.prepare's DDP wrapper, default arguments
        model = torch.nn.parallel.DistributedDataParallel(model)
    config = SparseConfig(density=0.1, sparse_init="ERK", growth="gradient")
    sp = Sparsifier(model, local_optimizer(optimizer), config, total_steps=1000)  # as Trainer._build_sparsity

    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(batch, *INPUT[dataset], generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sp.step()

    times = []
    for i in range(steps + 1):  # the first is the warm-up (optimizer state created there)
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()
        if i:
            times.append(time.perf_counter() - t0)

    # What this rank holds after the last step (gradients not zeroed, as at an update step).
    params = list(dict.fromkeys(model.parameters()))
    held = {
        "params": sum(_local_bytes(p) for p in params),
        "grads": sum(_local_bytes(p.grad) for p in params),
        "optimizer": sum(_local_bytes(v) for s in local_optimizer(optimizer).state.values()
                         for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0),
        "sparse": sum(t.numel() * t.element_size()
                      for d in (sp.state.masks, sp.state.fired) for t in d.values()),
        "multipliers": sum(t.numel() * t.element_size() for t in getattr(sp, "_mult", {}).values()),
    }
    ddp_buckets = 0
    if stage in ("ddp", "zero1"):
        try:
            sizes = model._get_ddp_logging_data().get("bucket_sizes", "")
            ddp_buckets = sum(int(s) for s in str(sizes).split(",") if s.strip())
        except Exception:
            ddp_buckets = -1
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    # One mask update right after a backward (gradients of this batch present).
    optimizer.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    counter = SentCounter()
    dist.barrier()
    rss_before = _status_kb("VmRSS") / 1024
    reset = _reset_peak()
    counter.on = True
    t0 = time.perf_counter()
    sp.update()
    update_s = time.perf_counter() - t0
    counter.on = False
    update_peak = _status_kb("VmHWM") / 1024
    dist.barrier()
    peak = max(peak_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, update_peak)

    result = {"rank": rank, "held": held, "ddp_buckets": ddp_buckets, "peak_rss_mb": peak,
              "rss_start_mb": rss_start, "step_s": statistics.median(times), "step_times": times,
              "update_s": update_s, "update_sent": counter.sent, "update_calls": counter.calls,
              "update_extra_mb": (update_peak - rss_before) if reset else None,
              "update_held": sp.update_cost.held_bytes if getattr(sp, "update_cost", None) else None,
              "density": sp.density}
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(name: str, stage: str, n: int, steps: int, batch: int, group_size: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(n, _free_port(), name, stage, steps, batch, group_size, out), nprocs=n, join=True)
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(n)]


# --- tables ------------------------------------------------------------------------------
COLS = ("params", "grads", "optimizer", "sparse", "multipliers")


def summarise(ranks: list[dict]) -> dict:
    row = {c: max(r["held"][c] for r in ranks) / MB for c in COLS}
    row["total"] = max(sum(r["held"][c] for c in COLS) for r in ranks) / MB
    row["peak_rss"] = max(r["peak_rss_mb"] for r in ranks)
    row["peak_less_start"] = max(r["peak_rss_mb"] - r["rss_start_mb"] for r in ranks)
    row["step_s"] = statistics.median(r["step_s"] for r in ranks)
    row["update_s"] = max(r["update_s"] for r in ranks)
    row["sent_r0"] = ranks[0]["update_sent"] / MB
    row["sent_other"] = max((r["update_sent"] for r in ranks[1:]), default=0) / MB
    extra = [r["update_extra_mb"] for r in ranks if r["update_extra_mb"] is not None]
    row["update_extra"] = max(extra) if extra else float("nan")
    held = ranks[0].get("update_held")
    row["update_held"] = held / MB if held is not None else float("nan")
    row["ddp_buckets"] = max(r["ddp_buckets"] for r in ranks) / MB
    return row


def table(name: str, n: int, rows: dict[str, dict], group_size: int) -> str:
    head = ("| stage | params MB | grads MB | optimizer MB | sparse state MB | mask mult. MB | total MB "
            "| total vs ddp | peak RSS MB (less runtime) | step s | update s | update vs zero3 "
            "| update MB sent r0 / other | update extra RSS MB | update held r0 MB |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    base = rows.get("ddp")
    ref = rows.get("zero3")
    for stage, r in rows.items():
        label = f"hsdp ({n // group_size}x{group_size})" if stage == "hsdp" else stage
        vs_ddp = f"{r['total'] / base['total']:.2f}x" if base else "-"
        vs_z3 = f"{r['update_s'] / ref['update_s']:.2f}x" if ref else "-"
        lines.append(
            f"| {label} | {r['params']:.1f} | {r['grads']:.1f} | {r['optimizer']:.1f} | {r['sparse']:.2f} "
            f"| {r['multipliers']:.1f} | {r['total']:.1f} | {vs_ddp} | {r['peak_rss']:.0f} ({r['peak_less_start']:.0f}) "
            f"| {r['step_s']:.2f} | {r['update_s']:.2f} | {vs_z3} | {r['sent_r0']:.2f} / {r['sent_other']:.2f} "
            f"| {r['update_extra']:.0f} | {r['update_held']:.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = list(results)
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.8), squeeze=False)
    colours = {"params": "#4477aa", "grads": "#66ccee", "optimizer": "#228833", "sparse": "#ccbb44",
               "multipliers": "#ee6677"}
    labels = {"params": "parameters", "grads": "gradients", "optimizer": "optimizer state",
              "sparse": "masks + explored", "multipliers": "mask multipliers"}
    for ax, case in zip(axes[0], cases):
        rows = results[case]["rows"]
        stages = list(rows)
        bottom = [0.0] * len(stages)
        for c in COLS:
            vals = [rows[s][c] for s in stages]
            ax.bar(stages, vals, bottom=bottom, color=colours[c], label=labels[c])
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(case, fontsize=9)
        ax.set_ylabel("MB held per rank (largest rank)")
        ax.tick_params(axis="x", labelsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "wrn-28-10"])
    parser.add_argument("--processes", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--stages", nargs="+", default=list(STAGES_ALL), choices=STAGES_ALL)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--batch", type=int, default=8, help="per rank")
    parser.add_argument("--shard-group-size", type=int, default=2, help="hsdp's shard group")
    parser.add_argument("--quick", action="store_true", help="digits-mlp, N = 2, 2 steps: a smoke run")
    parser.add_argument("--json", help="write every rank's figures here")
    parser.add_argument("--plot", help="write a stacked bar plot of the memory held here (png)")
    parser.add_argument("--replot", metavar="JSON", help="only draw --plot from an earlier run's --json")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), args.plot or "sharding_memory.png")
        return
    if args.quick:
        args.models, args.processes, args.steps = ["digits-mlp"], [2], 2
    print(f"# {platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, gloo, 1 thread per process, "
          f"batch {args.batch} per rank, ERK density 0.1, RigL, {args.steps} timed steps after 1 warm-up")
    results = {}
    for name in args.models:
        for n in args.processes:
            rows, raw = {}, {}
            for stage in args.stages:
                if stage == "hsdp" and (n % args.shard_group_size or n == args.shard_group_size):
                    continue  # 1 x group: that is zero3
                t0 = time.perf_counter()
                raw[stage] = run_case(name, stage, n, args.steps, args.batch, args.shard_group_size)
                rows[stage] = summarise(raw[stage])
                print(f"  {name} N={n} {stage}: {time.perf_counter() - t0:.0f} s wall", flush=True)
            case = f"{name}, N={n}"
            results[case] = {"rows": rows, "ranks": raw}
            print(f"\n## {case} (density {raw[args.stages[0]][0]['density']:.3f})\n")
            print(table(name, n, rows, args.shard_group_size), flush=True)
            if "ddp" in rows:
                ddp = rows["ddp"]
                print("memory vs ddp: " + ", ".join(
                    f"{s}: params {r['params'] / ddp['params']:.2f}, grads {r['grads'] / ddp['grads']:.2f}, "
                    f"optimizer {r['optimizer'] / ddp['optimizer']:.2f}, sparse {r['sparse'] / ddp['sparse']:.2f}"
                    for s, r in rows.items() if s != "ddp"))
            if "ddp" in rows and rows["ddp"]["ddp_buckets"] > 0:
                print(f"(ddp and zero1 also hold DDP's gradient buckets: {rows['ddp']['ddp_buckets']:.1f} MB, "
                      f"not in the table)")
            print(flush=True)
            if args.json:  # after every case, so an interrupted run keeps what it measured
                Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
