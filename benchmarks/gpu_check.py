"""The GPU check: what sparsity costs on one GPU (H100/H200 class), measured side by side in one run.

    PYTHONPATH=. python benchmarks/gpu_check.py OUT           # on the GPU machine, under 8 minutes
    PYTHONPATH=. python benchmarks/gpu_check.py --smoke OUT   # the same code paths on a CPU, 1-3 minutes

``--smoke`` measures nothing: CIFAR ResNet-20 at 32x32, batch 4, fp32, two timed steps per
variant, torch.compile with the aot_eager backend (inductor's code generation takes minutes on
2 cores) in parts 1-2; 16 small JPEGs, DALI CPU and torchvision on the CPU in part 3 (DALI
mixed: not measured, no GPU; whether DALI builds a mixed pipeline without one is recorded);
ResNet-18 on two processes (gloo, ``ACCELERATE_USE_CPU``), steps 4 then 6, in part 4.

Writes ``OUT/gpu_check.json`` and the table ``OUT/gpu_check.md`` (rewritten after every part,
so a run cut short keeps what it measured). Each part runs in its own try/except: a part that
cannot run (no GPU, DALI or W&B missing) records ``not measured: <why>``, one that fails
records its error line, and the others go on.

1. ``train_step``: ResNet-50, batch 256 at 224, bf16 autocast, channels_last, a synthetic
   batch already on the device, SGD with momentum. Step time (ms) and images/s of the dense
   step against the masked step (the dense step + the masks multiplied into the weights and
   their momenta after ``optimizer.step()``, what ``Sparsifier.step()`` does between updates)
   at ERK density 0.1 and 0.2, with the masks applied as a float multiply (``apply_mode
   float``), a bool multiply (``apply_mode bool``) and ``torch._foreach_mul_`` over all masked
   weights and their momenta (``apply_mode foreach``), eager and under ``torch.compile``; the
   masked/dense step-time ratio (goal <= 1.03) and the time of one mask application alone.
   One model is trained by every variant in turn (a dense kernel's time does not depend on
   which weights are zero), so it is compiled once, and the variants alternate in rounds so
   that they see the same machine state (clocks, temperature, other load).
2. ``mask_update``: one RigL update (the RigL-ITOP recipe's sparsity settings) and one GraNet
   update (the GraNet recipe's, inside its pruning window) of ResNet-50 on the device, ms,
   and as a share of the time between two updates (the recipe's ``update_frequency`` dense
   steps at its per-process batch, measured here).
3. ``input_pipeline``: images/s of the training input over a generated ImageNet-layout tree
   (2,000 JPEGs of 500x375 .. 800x600 px): DALI mixed (nvJPEG) and DALI CPU (the project's
   ``DaliLoader``, fused decode + random-resized-crop to 224, flip, normalise) against
   torchvision's ``decode_jpeg`` on the GPU with the same crop, flip and normalisation there.
4. ``end_to_end``: ``accelerate launch -m launcher.train`` of the RigL-ITOP ResNet-50 recipe on
   that tree (DALI mixed decoding, or the torchvision loader where DALI is missing; bf16; W&B
   offline; mask updates every 40 steps: the recipe's 4000 exceed the whole 100-epoch run on
   2,000 images, which the trainer refuses) to step 100, then ``--resume auto`` to step 200.
   Checks (a failure exits with status 1): the masks right after the resume (a
   checkpoint at step 101, no update there) equal the step-100 checkpoint's; mask updates
   happened before it (else the check would be trivial); the ITOP rate, the FLOPs and every
   layer's density are in ``metrics.jsonl`` and in the W&B offline run.

It also records the mask ``apply_mode`` it would choose for this device (the fastest mask
application measured in part 1), for the code's ``auto``. Exit status 0 unless a check fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import importlib.util
import json
import os
import pathlib
import random
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch

import models
from bench_imagenet_loader import epoch_folder, time_epochs, write_images
from bench_masks import timed
from data_pipelines.imagenet import dali_available
from data_pipelines.imagenet.torchvision_backend import normalise, random_resized_crop_box
from itop_dist import SparseConfig, Sparsifier, total_steps
from itop_dist.config import APPLY_MODES as CONFIG_APPLY_MODES

REPO = pathlib.Path(__file__).resolve().parents[1]
RIGL_RECIPE = REPO / "configs" / "imagenet_resnet50_rigl_itop_d0.1.yaml"
GRANET_RECIPE = REPO / "configs" / "imagenet_resnet50_suptickets_granet.yaml"
IMAGENET_TRAIN_IMAGES = 1_281_167  # the recipe's epoch, for the schedules of part 2
GOAL = 1.03  # masked/dense step-time ratio the sparse trainer aims at
APPLY_MODES = tuple(m for m in CONFIG_APPLY_MODES if m != "auto")  # what "auto" chooses from

# Sizes of everything: the full check, and the smoke run on a shared 2-core CPU, where
# ResNet-50's steps and mask applications take seconds and bf16 autocast is slower than fp32:
# there a CIFAR ResNet-20 (parts 1-2) and ResNet-18 (part 4, a model that fits ImageNet) in
# fp32. ``passes``: an input-pipeline epoch lists the files that many times, so that DALI's
# pipeline, built once per epoch, weighs little, as in an ImageNet epoch.
SIZES = {
    False: dict(model=("resnet50", "imagenet"), bf16=True, batch=256, image=224, rounds=3, steps=5,
                repeats=10, compile_backend="inductor", update_batch=None,
                images=2000, val_images=200, classes=20, loader_batch=64, passes=4,
                jpeg_sizes=[(500, 375), (640, 480), (800, 600), (375, 500), (500, 333), (600, 450)],
                e2e=dict(model=None, precision="bf16", first=100, last=200, update_frequency=40,
                         processes=1, batch=64, log_every=10, timeout=240)),
    # torch.compile's inductor needs a minute or two per model on 2 CPU cores; aot_eager runs
    # the same Dynamo capture and AOT autograd without code generation.
    True: dict(model=("cifar_resnet_20", "cifar10"), bf16=False, batch=4, image=32, rounds=2, steps=2,
               repeats=3, compile_backend="aot_eager", update_batch=4,
               images=16, val_images=4, classes=2, loader_batch=4, passes=1,
               jpeg_sizes=[(64, 48), (80, 60), (48, 64)],
               e2e=dict(model="resnet18", precision="no", first=4, last=6, update_frequency=3,
                        processes=2, batch=2, log_every=1, timeout=300)),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn, device: torch.device):
    """``fn`` followed by a device synchronisation, so that wall time covers its kernels."""
    def run():
        fn()
        sync(device)
    return run


def build_model(size: dict, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.create_model(*size["model"], num_classes=1000)
    return model.to(device, memory_format=torch.channels_last)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def make_step(net, optimizer, x, y, device, bf16: bool):
    """One training step (forward under bf16 autocast, backward, SGD) followed by ``apply`` (a
    mask application, or None for the dense step)."""
    def step(apply=None):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if apply is not None:
            apply()
    return step


# --- part 1 -------------------------------------------------------------------------------------
def part_train_step(size: dict, device: torch.device) -> dict:
    b, s = size["batch"], size["image"]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
    model = build_model(size, device)
    optimizer = sgd(model)
    x = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (b,), device=device)
    applies = {"dense": None}
    for density in (0.1, 0.2):
        for mode in APPLY_MODES:
            sp = Sparsifier(model, optimizer, SparseConfig(density=density, apply_mode=mode,
                                                           update_frequency=10**9), total_steps=10**6)
            applies[f"d{density} {mode}"] = sp.apply_masks
    eager = make_step(model, optimizer, x, y, device, size["bf16"])
    for _ in range(2):  # the momenta exist from here on; cuDNN's autotuning is done
        eager()
    sync(device)

    apply_ms = {}
    for key, fn in applies.items():
        if fn is not None:
            apply_ms[key] = timed(synced(fn, device), size["repeats"]) * 1e3

    rows, compile_error = [], None
    for compiled in (False, True):
        net = torch.compile(model, backend=size["compile_backend"]) if compiled else model
        step = make_step(net, optimizer, x, y, device, size["bf16"])
        t0 = time.perf_counter()
        try:
            for apply in applies.values():  # compiles on the first call; then one warm-up each
                step(apply)
            sync(device)
        except Exception as err:  # noqa: BLE001 - e.g. no Triton for inductor: the eager rows stand
            if not compiled:
                raise
            compile_error = first_line(err)
            break
        warmup_s = time.perf_counter() - t0
        times = {k: [] for k in applies}
        for _ in range(size["rounds"]):
            for key, apply in applies.items():
                sync(device)
                t0 = time.perf_counter()
                for _ in range(size["steps"]):
                    step(apply)
                sync(device)
                times[key].append((time.perf_counter() - t0) / size["steps"])
        dense = statistics.median(times["dense"])
        for key, ts in times.items():
            ms = statistics.median(ts)
            rows.append({"compile": size["compile_backend"] if compiled else "eager", "variant": key,
                         "step_ms": ms * 1e3, "images_per_s": b / ms, "ratio": ms / dense,
                         "apply_ms": apply_ms.get(key), "first_calls_s": warmup_s if key == "dense" else None})
        del net, step
        torch._dynamo.reset()
    # Chosen by the mask application alone: the step ratios differ by less than their noise.
    per_mode = {m: statistics.mean(v for k, v in apply_ms.items() if k.endswith(m)) for m in APPLY_MODES}
    choice = min(per_mode, key=per_mode.get)
    worst = max(r["ratio"] for r in rows if r["variant"] != "dense")
    return {"status": "measured", "model": size["model"][0], "masked_layers": len(sp.params), "batch": b, "image": s,
            "precision": "bf16 autocast" if size["bf16"] else "fp32", "memory_format": "channels_last",
            "rounds": size["rounds"], "steps_per_round": size["steps"], "rows": rows,
            "apply_ms_by_mode": per_mode, "apply_mode_choice": choice,
            "compile": f"error: {compile_error}" if compile_error else size["compile_backend"],
            "worst_masked_ratio": worst, "goal_ratio": GOAL, "goal_met": worst <= GOAL}


# --- part 2 -------------------------------------------------------------------------------------
def recipe(path: pathlib.Path):
    from launcher.config import parse_config

    return parse_config(["--config", str(path), "--data-dir", "unused"])


def part_mask_update(size: dict, device: torch.device) -> dict:
    s, rows = size["image"], []
    for name, path in (("RigL", RIGL_RECIPE), ("GraNet", GRANET_RECIPE)):
        cfg = recipe(path)
        b = size["update_batch"] or cfg.data.batch_size
        model = build_model(size, device)
        optimizer = sgd(model)
        x = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (b,), device=device)
        step = make_step(model, optimizer, x, y, device, size["bf16"])
        step_s = timed(synced(step, device), size["repeats"])  # leaves gradients and momenta
        epoch = IMAGENET_TRAIN_IMAGES // cfg.data.batch_size
        sp = Sparsifier(model, optimizer, cfg.sparsity, total_steps(epoch, cfg.schedule.epochs,
                                                                    cfg.schedule.multiplier),
                        epoch_steps=epoch * cfg.schedule.multiplier)
        k = cfg.sparsity.update_frequency
        sp.state.step = k  # the first update step: inside GraNet's pruning window
        update_s = timed(synced(sp.update, device), max(2, size["repeats"] // 3))
        rows.append({"method": name, "model": size["model"][0], "recipe": path.name, "update_ms": update_s * 1e3,
                     "update_frequency": k, "batch": b, "dense_step_ms": step_s * 1e3,
                     "share_of_interval": update_s / (k * step_s), "density_after": sp.density})
        del model, optimizer, sp, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"status": "measured", "rows": rows}


# --- part 3 -------------------------------------------------------------------------------------
def write_tree(root: pathlib.Path, size: dict) -> dict:
    """ImageNet's layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG), written by parallel processes."""
    workers = max(1, min(16, os.cpu_count() or 1))
    jobs = []
    for split, count in (("train", size["images"]), ("val", size["val_images"])):
        chunk = -(-count // workers)
        jobs += [(root, min(chunk, count - a), size["classes"], size["jpeg_sizes"], 0, split, a)
                 for a in range(0, count, chunk)]
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for future in [pool.submit(write_images, *job) for job in jobs]:
            future.result()
    return {"train": size["images"], "val": size["val_images"], "classes": size["classes"],
            "sizes": [f"{w}x{h}" for w, h in size["jpeg_sizes"]], "write_s": time.perf_counter() - t0}


def dali_epochs(folder, size: dict, gpu: bool, threads: int):
    from data_pipelines.imagenet.dali_backend import DaliLoader

    loader = DaliLoader(folder, size["loader_batch"], train=True, image_size=size["image"],
                        channels_last=True, num_workers=threads, gpu=gpu)

    def run(epoch):
        loader.set_epoch(epoch)
        yield from loader
        sync(torch.device("cuda") if gpu else torch.device("cpu"))
    return run


def torchvision_epochs(folder, size: dict, device: torch.device):
    """``torchvision.io.decode_jpeg`` of each batch's files on ``device`` (one batched call),
    then the training crop (the project's ``random_resized_crop_box``), flip and normalisation
    there; files read in this thread."""
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms.v2 import functional as tvf

    b, s = size["loader_batch"], size["image"]

    def run(epoch):
        rng = random.Random(epoch)
        order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(epoch)).tolist()
        for i in range(0, len(order) - b + 1, b):
            data = [read_file(str(folder.path(j))) for j in order[i:i + b]]
            with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs for TorchCodec
                warnings.simplefilter("ignore", DeprecationWarning)
                images = decode_jpeg(data, device=device)
            crops = []
            for img in images:
                top, left, h, w = random_resized_crop_box(img.shape[1], img.shape[2], rng)
                img = tvf.resized_crop(img, top, left, h, w, [s, s], antialias=True)
                crops.append(tvf.horizontal_flip(img) if rng.random() < 0.5 else img)
            yield normalise(torch.stack(crops), channels_last=True), folder.labels[order[i:i + b]]
        sync(device)
    return run


def dali_mixed_without_gpu() -> str:
    """Whether DALI builds a pipeline with a ``mixed`` decoder on a machine without a GPU."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        jpegs, _ = fn.readers.file(file_root=str(REPO), files=["README.md"], labels=[0])
        return fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)

    try:
        pipe().build()
    except RuntimeError as err:
        return f"not buildable: {first_line(err)}"
    return "built"


def part_input_pipeline(size: dict, device: torch.device, root: pathlib.Path) -> dict:
    folder = epoch_folder(root, size["passes"])
    threads = max(1, min(16, os.cpu_count() or 1))
    have_dali, why = dali_available()
    gpu = device.type == "cuda"
    candidates = {
        "DALI mixed (nvJPEG)": (lambda: dali_epochs(folder, size, True, threads)) if have_dali and gpu
        else f"not measured: {'no GPU' if have_dali else 'DALI missing: ' + why}",
        "DALI CPU": (lambda: dali_epochs(folder, size, False, threads)) if have_dali
        else f"not measured: DALI missing: {why}",
        f"torchvision decode_jpeg ({device.type})": lambda: torchvision_epochs(folder, size, device),
    }
    rows = []
    for name, make in candidates.items():
        if isinstance(make, str):
            rows.append({"pipeline": name, "status": make})
            continue
        try:
            seconds, _, count = time_epochs(make(), epochs=1, repeats=2)
            rows.append({"pipeline": name, "status": "measured", "images_per_s": count / seconds})
        except Exception as err:  # noqa: BLE001 - one pipeline failing leaves the others measured
            rows.append({"pipeline": name, "status": f"error: {first_line(err)}"})
    out = {"status": "measured", "images_per_epoch": len(folder), "batch": size["loader_batch"],
           "image": size["image"], "threads": threads, "rows": rows}
    if have_dali and not gpu:
        out["dali_mixed_build_without_gpu"] = dali_mixed_without_gpu()
    return out


# --- part 4 -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run: pathlib.Path, tree: pathlib.Path, size: dict, gpu: bool, loader: str,
           extra: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch -m launcher.train`` of the RigL-ITOP recipe on ``tree``. The recipe's
    update_frequency (4000) exceeds the whole run on a 2,000-image tree (the trainer refuses a
    run without a mask update), so it is overridden to put updates before the checkpoint. Every
    checkpoint is kept (the one right after the resume is read at the end)."""
    e2e = size["e2e"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_"))}
    env.update(WANDB_API_KEY="", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if gpu:
        launcher = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", e2e["precision"],
                    "--dynamo_backend", "no"]
    else:
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
        launcher = ["--multi_gpu", "--num_processes", str(e2e["processes"]), "--num_machines", "1",
                    "--mixed_precision", e2e["precision"], "--dynamo_backend", "no",
                    "--main_process_port", str(free_port())]
    args = ["--config", str(RIGL_RECIPE), "--data-dir", str(tree), "--loader", loader,
            "--decode-device", "gpu" if gpu else "cpu", "--mixed-precision", e2e["precision"],
            "--wandb-mode", "offline", *(["--model", e2e["model"]] if e2e["model"] else []),
            "--update_frequency", str(e2e["update_frequency"]), "--batch-size", str(e2e["batch"]),
            "--test-batch-size", str(e2e["batch"]), "--image-size", str(size["image"]),
            "--log-interval", str(e2e["log_every"]), "--keep-last", "100", "--no-progress", "--no-plots",
            "--output-dir", str(run), *extra]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "launcher.train", *args]
    with subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as child:
        try:
            stdout, stderr = child.communicate(timeout=e2e["timeout"])
        except subprocess.TimeoutExpired:
            kill_tree(child.pid)
            child.communicate()
            raise TimeoutError(f"training ({shlex.join(extra)}) did not end within {e2e['timeout']} s; "
                               f"killed") from None
    proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise CheckFailed(f"training ({shlex.join(extra)}) exited with status {proc.returncode}: "
                          f"{failure_line(proc.stderr or proc.stdout)}")
    return proc


def kill_tree(pid: int) -> None:
    """Kill process ``pid`` and all its descendants: the trainers are accelerate's children (or
    torchrun's, in sessions of their own), would keep the GPU and the output pipes, and would
    wait forever for their launcher. psutil comes with accelerate."""
    import psutil

    root = psutil.Process(pid)
    for proc in [*root.children(recursive=True), root]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def failure_line(output: str) -> str:
    """The trainer's own reason in a failed launch's output: its ``itop-train: error:`` line, else
    the first exception line that is not the launcher's (accelerate re-raises every failure as
    CalledProcessError or ChildFailedError after the trainer's traceback)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    refusals = [ln for ln in lines if ln.startswith("itop-train: error:")]
    errors = [ln for ln in lines if re.match(r"[\w.]+(Error|Exception|Interrupt)\b", ln)
              and not re.search(r"CalledProcessError|ChildFailedError", ln)]
    return (refusals or errors or lines[-1:] or ["no output"])[0]


def checkpoint_masks(run: pathlib.Path, step: int) -> dict[str, torch.Tensor]:
    """The masks of checkpoint ``step``, read as any tool without the model reads them."""
    from itop_dist.state import saved_masks
    from launcher.checkpoint import read_state

    folder = next(p for p in (run / "checkpoints").glob("step-*") if int(p.name.split("-")[1]) == step)
    return saved_masks(read_state(folder, "sparse_state")["state"]["masks"])


def wandb_history(run: pathlib.Path) -> tuple[list[dict], int] | str:
    """(history records of every offline segment, number of W&B run ids; none: the trainer
    wrote no W&B run), read with W&B's own reader (``wandb leet inspect``, as
    tests/test_tracking.py does); or why they cannot be read."""
    if importlib.util.find_spec("wandb") is None:
        return "not measured: wandb is not installed"
    segments = sorted((run / "wandb").glob("offline-run-*"))
    if not segments:
        return [], 0
    beside = pathlib.Path(sys.executable).parent / "wandb"
    exe = str(beside) if beside.exists() else shutil.which("wandb")
    if exe is None:
        return "not measured: no wandb command"
    records = []
    for segment in segments:
        out = subprocess.run([exe, "leet", "inspect", "--json", str(segment)],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            return f"not measured: wandb leet inspect failed: {first_line(out.stderr or 'no output')}"
        records += [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    history = [r["history"]["item"] for r in records if r.get("type") == "history"]
    return history, len({p.name.rsplit("-", 1)[1] for p in segments})


def part_end_to_end(size: dict, device: torch.device, tree: pathlib.Path, work: pathlib.Path) -> dict:
    e2e, gpu = size["e2e"], device.type == "cuda"
    if importlib.util.find_spec("accelerate") is None:
        return {"status": "not measured: accelerate is not installed"}
    have_dali, why = dali_available()
    # Without DALI the checks still run, on the torchvision loader.
    loader = "dali" if have_dali else "torchvision"
    run = work / "run"
    a, k = e2e["first"], e2e["update_frequency"]
    t0 = time.perf_counter()
    launch(run, tree, size, gpu, loader, ["--max-steps", str(a)])
    first_s = time.perf_counter() - t0
    before = checkpoint_masks(run, a)
    t0 = time.perf_counter()
    proc = launch(run, tree, size, gpu, loader,
                  ["--resume", "auto", "--max-steps", str(e2e["last"]), "--save-every", str(a + 1)])
    resume_s = time.perf_counter() - t0
    after = checkpoint_masks(run, a + 1)
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    layers = [r["mask/layer_density"] for r in records if "mask/layer_density" in r]
    rates = [(r["step"], r["itop/rate"]) for r in records if "itop/rate" in r and not r.get("summary")]
    flops = [r["flops/train_cumulative"] for r in records if "flops/train_cumulative" in r and not r.get("summary")]
    summary = records[-1]
    density = recipe(RIGL_RECIPE).sparsity.density
    checks = {
        "masks_identical_after_resume": before.keys() == after.keys()
        and all(torch.equal(before[n], after[n]) for n in before),
        "masks_updated_before_checkpoint": any(s <= a and r > density + 1e-6 for s, r in rates),
        "resumed_from_checkpoint": "resumed from" in proc.stdout and f"step-{a:08d}" in proc.stdout,
        "run_reached_last_step": summary.get("summary") is True and summary.get("step") == e2e["last"],
        "metrics_itop_rate_logged": bool(rates) and max(s for s, _ in rates) == e2e["last"],
        "metrics_flops_logged": len(flops) >= 2 and flops == sorted(flops) and "test_flops_rel" in summary,
        "metrics_layer_densities_logged": bool(layers) and all(len(d) == len(before) for d in layers),
    }
    out = {"status": "measured", "model": e2e["model"] or recipe(RIGL_RECIPE).model.name,
           "precision": e2e["precision"], "processes": e2e["processes"],
           "loader": loader if have_dali else f"torchvision (DALI missing: {why})", "steps": [a, e2e["last"]],
           "update_frequency": k, "masked_layers": len(before), "layer_density_records": len(layers),
           "itop_rate_at_checkpoint": max((r for s, r in rates if s <= a), default=None),
           "final_itop_rate": summary.get("final_itop_rate"), "train_flops": summary.get("train_flops"),
           "first_run_s": first_s, "resumed_run_s": resume_s}
    wb = wandb_history(run)
    if isinstance(wb, str):
        out["wandb"] = wb
    else:
        history, ids = wb
        keys = set().union(*history) if history else set()
        out["wandb"] = "checked"
        out["wandb_layer_keys"] = sum(key.startswith("density/") for key in keys)
        checks.update({
            "wandb_itop_rate_and_flops_logged": {"itop/rate", "flops/train_cumulative", "flops/train_rel"} <= keys,
            "wandb_layer_densities_logged": out["wandb_layer_keys"] == len(before),
            "wandb_one_run_across_resume": ids == 1,
        })
    out["checks"] = checks
    return out


# --- the run ------------------------------------------------------------------------------------
class CheckFailed(RuntimeError):
    """A check (not a measurement) failed: the script exits with status 1."""


def first_line(what) -> str:
    """The first line of an error (after its type) or of a text."""
    lines = str(what).strip().splitlines() or [""]
    return f"{type(what).__name__}: {lines[0]}" if isinstance(what, BaseException) else lines[0]


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def table(rows: list[dict], columns: list[tuple[str, str, int]]) -> list[str]:
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(key), d) for key, _, d in columns) + " |" for r in rows]
    return lines


def markdown(report: dict) -> str:
    meta, parts = report["meta"], report["parts"]
    lines = [f"# GPU check{' (smoke: not a measurement of anything)' if meta['smoke'] else ''}", "",
             f"{meta['device']}; torch {meta['torch']}, DALI {meta['dali']}; {meta['date']}; "
             f"{meta['wall_s']:.0f} s", ""]
    for name, part in parts.items():
        lines += [f"## {name}", ""]
        if part.get("status") != "measured":
            lines += [part.get("status", "?"), ""]
            continue
        if name == "train_step":
            lines += [f"{part['model']}, batch {part['batch']} at {part['image']}, {part['precision']}, "
                      f"{part['memory_format']}, {part['masked_layers']} masked layers; median of "
                      f"{part['rounds']} rounds x {part['steps_per_round']} steps; ratio = step / dense "
                      f"step of the same compile setting (goal <= {part['goal_ratio']})", ""]
            lines += table(part["rows"], [("compile", "compile", 0), ("variant", "masks", 0),
                                          ("step_ms", "step ms", 2), ("images_per_s", "images/s", 0),
                                          ("ratio", "masked/dense", 3), ("apply_ms", "apply alone ms", 3)])
            lines += ["", f"apply_mode for {meta['device_type']}: **{part['apply_mode_choice']}** "
                      f"(mean apply ms: " + ", ".join(f"{m} {v:.3f}" for m, v in part["apply_ms_by_mode"].items())
                      + f"); worst masked/dense {part['worst_masked_ratio']:.3f}, goal met: "
                      f"{fmt(part['goal_met'])}; torch.compile: {part['compile']}", ""]
        elif name == "mask_update":
            lines += [f"{part['rows'][0]['model']}, masks of each recipe's sparsity settings", ""]
            lines += table(part["rows"], [("method", "method", 0), ("update_ms", "one update ms", 1),
                                          ("update_frequency", "update every", 0), ("batch", "batch", 0),
                                          ("dense_step_ms", "dense step ms", 2),
                                          ("share_of_interval", "share of interval", 5)]) + [""]
        elif name == "input_pipeline":
            lines += [f"{part['images_per_epoch']} images per epoch, batch {part['batch']}, crop to "
                      f"{part['image']}, {part['threads']} threads", ""]
            lines += table(part["rows"], [("pipeline", "pipeline", 0), ("images_per_s", "images/s", 0),
                                          ("status", "status", 0)])
            if "dali_mixed_build_without_gpu" in part:
                lines += ["", f"DALI mixed pipeline without a GPU: {part['dali_mixed_build_without_gpu']}"]
            lines += [""]
        elif name == "end_to_end":
            lines += [f"{part['model']}, precision {part['precision']}, {part['loader']} loader, "
                      f"{part['processes']} process(es), steps {part['steps'][0]} then resumed to "
                      f"{part['steps'][1]}, update every {part['update_frequency']}; "
                      f"{part['masked_layers']} masked layers; ITOP rate at the checkpoint "
                      f"{fmt(part['itop_rate_at_checkpoint'], 4)}, final {fmt(part['final_itop_rate'], 4)}; "
                      f"runs {part['first_run_s']:.0f} s + {part['resumed_run_s']:.0f} s; W&B: {part['wandb']}", ""]
            lines += table([{"check": k, "ok": v} for k, v in part["checks"].items()],
                           [("check", "check", 0), ("ok", "passed", 0)]) + [""]
    if report["failed_checks"]:
        lines += ["**Failed checks:** " + ", ".join(report["failed_checks"]), ""]
    return "\n".join(lines)


def write(out: pathlib.Path, report: dict, started: float) -> None:
    report["meta"]["wall_s"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the code paths")
    args = parser.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    size = SIZES[args.smoke]
    if args.smoke:  # on shared cores, OpenMP threads spinning against other processes cost more than they give
        torch.set_num_threads(1)
    gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if gpu else "cpu")
    have_dali, dali = dali_available()
    report = {
        "meta": {"smoke": args.smoke, "device_type": device.type,
                 "device": torch.cuda.get_device_name() if gpu else f"cpu, {os.cpu_count()} cores, no GPU used",
                 "torch": torch.__version__, "cuda": torch.version.cuda,
                 "dali": dali if have_dali else f"missing ({dali})",
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "argv": sys.argv[1:]},
        "parts": {}, "failed_checks": [],
    }
    if not gpu and not args.smoke:
        print("no GPU visible: measuring on the CPU at full size (use --smoke for the quick check)", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        tmp = pathlib.Path(tmp)
        tree = tmp / "imagenet"
        # Written before anything touches the GPU: the writers are forked processes.
        try:
            tree_info = write_tree(tree, size)
        except Exception as err:  # noqa: BLE001 - parts 3 and 4 then fail on the missing tree
            tree_info = {"error": first_line(err)}
        steps = {
            "train_step": lambda: part_train_step(size, device),
            "mask_update": lambda: part_mask_update(size, device),
            "input_pipeline": lambda: {"tree": tree_info, **part_input_pipeline(size, device, tree)},
            "end_to_end": lambda: part_end_to_end(size, device, tree, tmp),
        }
        for name, run in steps.items():
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                part = run()
            except CheckFailed as err:
                part = {"status": f"check failed: {err}"}
                report["failed_checks"].append(f"{name}: {err}")
            except Exception as err:  # noqa: BLE001 - a part's failure is recorded; the others run
                traceback.print_exc()
                part = {"status": f"error: {first_line(err)}"}
            part["seconds"] = time.perf_counter() - t0
            report["failed_checks"] += [f"{name}: {k}" for k, ok in part.get("checks", {}).items() if not ok]
            if name == "train_step" and part.get("status") == "measured":
                report["apply_mode_choice"] = {"device": device.type, "mode": part["apply_mode_choice"],
                                               "apply_ms": part["apply_ms_by_mode"]}
            report["parts"][name] = part
            write(args.out, report, started)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    write(args.out, report, started)
    print(markdown(report), flush=True)
    return 1 if report["failed_checks"] else 0


if __name__ == "__main__":
    sys.exit(main())
