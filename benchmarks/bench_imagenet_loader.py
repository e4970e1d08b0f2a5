"""Images/s of the ImageNet training loaders on the CPU: DALI vs torchvision vs PIL ImageFolder.

All read the same generated ImageNet-style tree (JPEGs of about 400x350 with photo-like
content, quality 90) with the training augmentation (random-resized-crop 224 + flip +
normalise), batch 64, 2 threads / workers, and produce normalised float32 batches:

* ``dali``: ``data_pipelines.imagenet.dali_backend`` CPU pipeline (``device_id=None``), fused decode + crop
  (``decoders.image_random_crop``);
* ``dali-decode-then-crop``: the same with a full ``decoders.image`` then ``random_resized_crop``
  (what the fused decoder saves);
* ``torchvision``: ``data_pipelines.imagenet.TorchvisionLoader`` (``decode_jpeg`` +
  ``transforms.v2`` functionals on tensors, 2 DataLoader workers);
* ``pil``: ``torchvision.datasets.ImageFolder`` (PIL) + RandomResizedCrop, RandomHorizontalFlip,
  ToTensor, Normalize in 2 DataLoader workers (the reference code's loader).

An "epoch" lists the generated files ``--passes`` times (4 x 512 = 32 batches), so that
starting the pipeline or the workers at each epoch (0.1 s for DALI) weighs about as little as
in an ImageNet epoch of 10 009 batches. Each is run for one warm-up epoch (page cache, worker
start), then timed over ``--epochs`` epochs, ``--repeats`` times; the best time is reported (least disturbed by other load), with
the CPU time it took (this process's threads + the DataLoader workers): images per
CPU-second is what the loader costs, and is less sensitive to other load on the machine.

    .venv/bin/python benchmarks/bench_imagenet_loader.py            # ~1-2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipelines.imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, TorchvisionLoader, scan_split


def epoch_folder(root: Path, passes: int) -> ImageFolder:
    """The training split of ``root`` with its file list repeated ``passes`` times."""
    f = scan_split(root, "train")
    return ImageFolder(f.root, f.classes, f.files * passes, f.labels.repeat(passes))


def write_images(root: Path, count: int, classes: int, sizes: list[tuple[int, int]], seed: int = 0,
                 split: str = "train", start: int = 0) -> None:
    """JPEGs ``start`` .. ``start + count - 1`` in ``classes`` class folders of ``root/split``,
    image i of size ``sizes[i % len(sizes)]`` (W, H): smooth colour fields plus fine noise (so
    they compress and decode like photos, not like flat colour). Seeded by (seed, start), so
    that disjoint ranges can be written by parallel processes."""
    rng = np.random.default_rng([seed, start])
    for i in range(start, start + count):
        w, h = sizes[i % len(sizes)]
        folder = root / split / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        pixels = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3), dtype=np.int16)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.JPEG", quality=90)


def cpu_seconds() -> float:
    """CPU time of this process (all threads: DALI's) and of its finished, joined children
    (DataLoader workers, which exit at the end of each epoch)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def time_epochs(make_iter, epochs: int, repeats: int) -> tuple[float, float, int]:
    """(best wall seconds for ``epochs`` epochs, CPU seconds of that repeat, images per
    epoch); one warm-up epoch first."""
    count = sum(x.shape[0] for x, _ in make_iter(0))
    best, best_cpu = float("inf"), 0.0
    for r in range(repeats):
        start, cpu = time.perf_counter(), cpu_seconds()
        for e in range(epochs):
            for x, _ in make_iter(1 + r * epochs + e):
                pass
        wall = time.perf_counter() - start
        if wall < best:
            best, best_cpu = wall, cpu_seconds() - cpu
    return best, best_cpu, count


def dali_loader(root: Path, args, fused: bool):
    from data_pipelines.imagenet import dali_backend as dali

    folder = epoch_folder(root, args.passes)
    loader = dali.DaliLoader(folder, args.batch, train=True, image_size=224, num_workers=args.workers)
    if fused:
        def run(epoch):
            loader.set_epoch(epoch)
            return iter(loader)
        return run

    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    @pipeline_def(batch_size=args.batch, num_threads=args.workers, device_id=None, seed=1)
    def decode_then_crop():
        jpegs, y = fn.readers.file(file_root=str(folder.root), files=list(folder.files),
                                   labels=folder.labels.tolist(), random_shuffle=True, name="Reader")
        img = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        img = fn.random_resized_crop(img, size=[224, 224])
        img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, mirror=fn.random.coin_flip(),
                                       mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])
        return img, y

    def run(epoch):
        pipe = decode_then_crop()
        pipe.build()
        it = DALIGenericIterator([pipe], ["x", "y"], reader_name="Reader",
                                 last_batch_policy=LastBatchPolicy.DROP)
        return ((b[0]["x"], b[0]["y"]) for b in it)
    return run


def torchvision_loader(root: Path, args):
    loader = TorchvisionLoader(epoch_folder(root, args.passes), args.batch, train=True, image_size=224,
                               num_workers=args.workers)

    def run(epoch):
        loader.set_epoch(epoch)
        return iter(loader)
    return run


def pil_loader(root: Path, args):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = torch.utils.data.ConcatDataset([datasets.ImageFolder(str(root / "train"), tf)] * args.passes)

    def init(_):
        torch.set_num_threads(1)

    def run(epoch):
        g = torch.Generator().manual_seed(epoch)
        return iter(torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, generator=g,
                                                num_workers=args.workers, drop_last=True,
                                                worker_init_fn=init, prefetch_factor=4))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(400, 350), metavar=("W", "H"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DALI threads / DataLoader workers")
    parser.add_argument("--passes", type=int, default=4, help="passes over the files per epoch")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=["dali", "dali-decode-then-crop", "torchvision", "pil"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root, args.images, args.classes, [tuple(args.size)])
        makers = {
            "dali": lambda: dali_loader(root, args, fused=True),
            "dali-decode-then-crop": lambda: dali_loader(root, args, fused=False),
            "torchvision": lambda: torchvision_loader(root, args),
            "pil": lambda: pil_loader(root, args),
        }
        print(f"{args.images} JPEGs {args.size[0]}x{args.size[1]}, batch {args.batch}, "
              f"{args.workers} threads/workers, training augmentation to 224, "
              f"epochs of {args.passes} passes, best of {args.repeats} x {args.epochs} epochs")
        rates = {}
        for name in args.only:
            seconds, cpu, per_epoch = time_epochs(makers[name](), args.epochs, args.repeats)
            images = per_epoch * args.epochs
            rates[name] = images / seconds
            print(f"  {name:22s} {rates[name]:7.0f} images/s   {images / cpu:7.0f} images per CPU-second")
        if "dali" in rates:
            for other in ("dali-decode-then-crop", "torchvision", "pil"):
                if other in rates:
                    print(f"  dali / {other}: {rates['dali'] / rates[other]:.2f}x")
        print(f"  (load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")

if __name__ == "__main__":
    main()
