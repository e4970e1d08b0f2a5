"""ImageNet from the standard folder layout, read batch by batch: NVIDIA DALI or torchvision.

``--data imagenet --data-dir ROOT`` reads ``ROOT/train/<wnid>/*.JPEG`` and
``ROOT/val/<wnid>/*.JPEG`` (the validation images sorted into class folders, as the usual
``valprep.sh`` does). Class index = position of the wnid in the sorted list of ``train/``
folders, for both splits. ``--loader`` picks the pipeline:

* ``dali`` (``data_pipelines.dali``): NVIDIA DALI; fused decode + random-resized-crop
  (``decoders.image_random_crop`` decodes only the crop), on the GPU ("mixed") when CUDA is
  available, else a CPU pipeline (``device_id=None``); DALI prefetches batches in its own
  threads.
* ``torchvision``: ``torchvision.io.decode_jpeg`` + ``transforms.v2`` functionals on uint8
  tensors in DataLoader workers (PIL only for files that decoder refuses: CMYK, PNG renamed
  .JPEG, ...). The fallback where DALI is not installed, and the comparison point.
* ``auto`` (default): DALI if it imports, else torchvision.

Both apply the reference augmentation (algorithms.md §6.6): training RandomResizedCrop to
``--image-size`` (area 0.08-1, aspect 3/4-4/3, 10 attempts, then a centre crop) + horizontal
flip (p 0.5); evaluation resizes the shorter side to round(image_size * 256/224) (256 for
224) and takes the centre crop; both normalise with the ImageNet mean/std.

Every batch is ``(x, y)``: x (B, 3, S, S) normalised float32 (float16 with ``fp16_output``;
channels_last memory format with ``channels_last``), y int64 (B,). On a GPU process
(``decode_device`` auto with CUDA, or gpu) both are on that GPU: DALI decodes there
("mixed"), torchvision copies uint8 batches there and normalises them there; otherwise both
are CPU tensors (the trainer moves them).

``num_workers`` (``--num-workers``) = DataLoader workers (torchvision) or DALI's decoding
threads (0: min(4, CPUs)). DALI builds a fresh pipeline for every epoch (its file list is the
epoch's order): about 0.1 s to the first batch for a few thousand files, 2 s for ImageNet's
1.28M (2-core CPU), then it prefetches 2 batches ahead.

Which samples a rank sees (identical for both pipelines, ``ImageNetLoader.indices``):

* training, epoch e: a permutation of all N samples seeded by (seed, e), the same on every
  rank; rank r takes its positions r, r + W, r + 2W, ... (strided: global step j consumes
  positions [j B W, (j+1) B W); the rule of every loader, ``loader.train_shard``) and the
  final partial global batch is dropped: every rank has ``len = (N // W) // B`` batches
  (10 009 for ImageNet's 1 281 167 images on 2 ranks x 64), the dropped remainder changes
  with the epoch;
* evaluation: no shuffle; rank r takes samples floor(N r / W) .. floor(N (r+1) / W) - 1 (DALI's
  own shard boundaries), ``len = ceil(shard / B)``, the last batch may be smaller. Summing
  per-rank counts counts every sample exactly once.

``set_epoch(e, start_batch=k)`` resumes mid-epoch: the next iteration yields exactly the
samples of batches k, k+1, ... of epoch e; the skipped batches are never read or decoded.
``set_epoch(e, start_sample=s)`` (training) resumes after s GLOBAL samples of the epoch, also
under another world size W' or batch size B' (an elastic resume): rank r yields positions
s + r, s + r + W', ... in ``batches_left()`` = (N - s) // (B' W') batches, so no sample of the
interrupted part is seen again; with the same W and B, s = k B W is ``start_batch=k``. The
torchvision pipeline draws each sample's crop and flip from a generator seeded by (seed,
epoch, sample), so a resumed epoch is identical to an uninterrupted one; DALI draws them from
its pipeline seed (seed, epoch, rank, s // (B W)), so after a resume the crops of that epoch
differ (the samples and their order do not).
"""

from __future__ import annotations

import logging
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .build import Loaders
from .config import DataConfig
from .loader import check_start_sample, derive_seed, train_batches, train_shard
from .registry import register_loaders

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolder",
    "ImageNetLoader",
    "TorchvisionLoader",
    "build_imagenet",
    "dali_available",
    "find_undecodable",
    "random_resized_crop_box",
    "resolve_loader",
    "scan_split",
    "shard_indices",
    "train_chunks",
    "train_permutation",
    "val_resize",
]

log = logging.getLogger("itop_dist.data")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What both pipelines decode; ImageNet itself holds only .JPEG files.
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10

# Stream tags of derive_seed (independent draws for equal keys).
_SHUFFLE = 10
_AUGMENT = 11
_DALI = 12


def val_resize(image_size: int) -> int:
    """Shorter side before the evaluation centre crop: 256 for 224, in the same ratio otherwise."""
    return int(round(image_size * 256 / 224))


# ---------------------------------------------------------------------------------------------
# The folder layout


@dataclass(frozen=True)
class ImageFolder:
    """One split on disk: ``root`` (the split folder), sorted class folder names (wnids),
    image paths relative to ``root`` (``wnid/name.JPEG``, sorted by class then name) and
    their int64 labels (indices into ``classes``)."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.files)

    def path(self, index: int) -> Path:
        return self.root / self.files[index]


def scan_split(data_dir: str | os.PathLike, split: str, classes: tuple[str, ...] | None = None) -> ImageFolder:
    """List ``data_dir/split/<wnid>/*`` (one ``os.scandir`` per folder, nothing opened).

    ``classes``: the training split's class list, for the validation split (its folders must
    be among them; labels follow that list). Raises a one-line ``ValueError`` naming the
    folder or file for: a missing root or split, files lying directly in the split folder
    (an unsorted validation set), no class folders, an empty class folder, a file that is not
    an image (by suffix: .JPEG/.jpg/.jpeg/.png), a sub-folder inside a class folder, and a
    validation class folder that ``train/`` lacks. Hidden files (``.name``) are skipped.
    Files are not opened here (1.28M opens would take minutes on a network file system):
    unreadable or corrupt images are named when a pipeline fails to decode them.
    """
    root = Path(data_dir)
    where = f"--data-dir {data_dir}"
    layout = f"expected {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG"
    if not root.is_dir():
        raise ValueError(f"{where}: no such folder; {layout}")
    folder = root / split
    if not folder.is_dir():
        raise ValueError(f"{where}: the {split} split is missing: no folder {folder}; {layout}")
    dirs, loose = [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            (dirs if entry.is_dir() else loose).append(entry.name)
    if loose:
        first = folder / sorted(loose)[0]
        raise ValueError(f"{where}: {first} lies directly in {folder}; images must sit in class "
                         f"folders, {split}/<wnid>/*.JPEG (sort the validation images into "
                         f"class folders first)")
    if not dirs:
        raise ValueError(f"{where}: {folder} has no class folders; {layout}")
    dirs.sort()
    if classes is None:
        classes = tuple(dirs)
    else:
        unknown = [d for d in dirs if d not in set(classes)]
        if unknown:
            raise ValueError(f"{where}: class folder {folder / unknown[0]} has no counterpart in "
                             f"{root / 'train'}; both splits must use the training classes")
    index = {name: i for i, name in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for name in dirs:
        class_dir = folder / name
        found = []
        with os.scandir(class_dir) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    raise ValueError(f"{where}: {class_dir / entry.name} is a folder; class folders "
                                     f"must hold image files only")
                if not entry.name.lower().endswith(IMAGE_SUFFIXES):
                    raise ValueError(f"{where}: {class_dir / entry.name} is not an image file "
                                     f"(expected {', '.join(IMAGE_SUFFIXES)}); remove it")
                found.append(entry.name)
        if not found:
            raise ValueError(f"{where}: class folder {class_dir} holds no images")
        found.sort()
        files += [f"{name}/{f}" for f in found]
        labels += [index[name]] * len(found)
    return ImageFolder(folder, tuple(classes), tuple(files), torch.tensor(labels, dtype=torch.int64))


def find_undecodable(paths: list[Path]) -> tuple[Path, str] | None:
    """The first of ``paths`` that cannot be read or fully decoded, with why; None if all can.

    Used after a pipeline failed on a batch (DALI's errors do not name the file): each file
    is opened and decoded completely by PIL (truncated files fail too).
    """
    from PIL import Image

    for path in paths:
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as err:
            return path, f"unreadable: {err.strerror or err}"
        if not head:
            return path, "empty file"
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds; all mean "not an image"
            return path, f"not a decodable image ({_pil_reason(err, path)})"
    return None


def _pil_reason(err: Exception, path: Path) -> str:
    """PIL's message, first line, without the path it repeats."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text.replace(f" '{path}'", "").replace(f" {path}", "") or type(err).__name__


def bad_file_error(path: Path, why: str) -> ValueError:
    """The one-line error of both pipelines for a file they cannot use."""
    return ValueError(f"--data-dir: cannot decode {path}: {why}; remove or replace the file")


# ---------------------------------------------------------------------------------------------
# Which samples each rank sees


def train_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """int64 (N,): the training order of ``epoch``, seeded by (seed, epoch), the same on every rank."""
    gen = torch.Generator().manual_seed(derive_seed(seed, _SHUFFLE, epoch))
    return torch.randperm(num_samples, generator=gen)


def train_chunks(num_samples: int, batch_size: int, world_size: int, seed: int, epoch: int,
                 start_sample: int = 0) -> torch.Tensor:
    """int64 (world_size, batches * B) with batches = (N - start_sample) // (B W): row r = the
    training samples of rank r in ``epoch`` from global position ``start_sample`` on, in order
    (``train_shard`` of the epoch's permutation)."""
    perm = train_permutation(num_samples, seed, epoch)
    return torch.stack([train_shard(perm, batch_size, r, world_size, start_sample) for r in range(world_size)])


def shard_indices(num_samples: int, batch_size: int, rank: int, world_size: int, *, train: bool,
                  seed: int = 0, epoch: int = 0, start_sample: int = 0) -> torch.Tensor:
    """int64 sample indices that ``rank`` visits in ``epoch``, in order (see the module doc).

    Training: positions start_sample + rank, + W, ... of the epoch's permutation, whole
    global batches only (``train_shard``). Evaluation (``start_sample`` unused): the
    contiguous range floor(N r / W) .. floor(N (r+1) / W) - 1.
    """
    if not train:
        return torch.arange(num_samples * rank // world_size, num_samples * (rank + 1) // world_size)
    perm = train_permutation(num_samples, seed, epoch)
    return train_shard(perm, batch_size, rank, world_size, start_sample).clone()


class ImageNetLoader:
    """Batches of ONE rank over one split, with the interface of ``BatchLoader``.

    ``len(loader)``: batches per epoch for this rank (the full epoch); ``num_samples``: samples
    of the whole split; ``set_epoch(epoch, start_batch=0, *, start_sample=None)``;
    ``batches_left()``; iteration yields ``(x, y)``. The subclasses (torchvision, DALI) only
    differ in how they turn files into batches (``_batches``).
    """

    backend = "base"

    def __init__(
        self,
        folder: ImageFolder,
        batch_size: int,
        *,
        train: bool,
        image_size: int = 224,
        augment: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        fp16_output: bool = False,
        channels_last: bool = False,
        num_workers: int = 0,
        gpu: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size} must be >= 1")
        self.folder = folder
        self.batch_size = batch_size
        self.train = train
        self.augment = augment and train
        self.image_size = image_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.fp16_output = fp16_output
        self.channels_last = channels_last
        self.num_workers = num_workers
        self.gpu = gpu
        self.num_samples: int = len(folder)
        if train:
            self._len = train_batches(self.num_samples, batch_size, world_size)  # (N // W) // B
        else:
            shard = len(shard_indices(self.num_samples, batch_size, rank, world_size, train=False))
            self._len = math.ceil(shard / batch_size)
        self.epoch = 0
        self.start_batch = 0
        self.start_sample = 0

    def __len__(self) -> int:
        """Batches per epoch for this rank (the full epoch, whatever ``set_epoch`` started at)."""
        return self._len

    @property
    def samples_per_epoch(self) -> int:
        """Global samples (all ranks together) a full training epoch consumes: len * B * W."""
        return self._len * self.batch_size * self.world_size

    def set_epoch(self, epoch: int, start_batch: int = 0, *, start_sample: int | None = None) -> None:
        """Make the next iteration yield epoch ``epoch`` from ``start_batch`` or ``start_sample`` on.

        ``start_batch=k``: this rank's batches k, k+1, ... of the epoch (training: the same as
        ``start_sample=k*B*W``). ``start_sample=s`` (training; keyword only, not with
        ``start_batch``): resume after s GLOBAL samples of the epoch (permutation positions
        [0, s)), possibly consumed under another world size or batch size; rank r yields
        positions s + r, s + r + W, ... in ``batches_left()`` = (N - s) // (B*W) batches. s must
        be in [0, num_samples].
        """
        b, w = self.batch_size, self.world_size
        if start_sample is not None:
            if start_batch != 0:
                raise ValueError(f"set_epoch: pass start_batch ({start_batch}) or start_sample "
                                 f"({start_sample}), not both")
            if not self.train and start_sample != 0:
                raise ValueError(f"start_sample {start_sample}: only training loaders resume by "
                                 f"global sample; an evaluation loader takes start_batch")
            start_sample = check_start_sample(start_sample, self.num_samples)
        elif not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} must be in [0, {len(self)}]")
        else:
            start_sample = start_batch * b * w if self.train else 0
        self.epoch = epoch
        self.start_sample = start_sample
        # The epoch's index of the first batch the iteration yields (DALI's pipeline seed).
        self.start_batch = start_sample // (b * w) if self.train else start_batch

    def batches_left(self) -> int:
        """Batches the next iteration yields on this rank (after ``set_epoch``); the same on
        every rank in training."""
        if self.train:
            return train_batches(self.num_samples, self.batch_size, self.world_size, self.start_sample)
        return len(self) - self.start_batch

    def indices(self, epoch: int, start_sample: int = 0) -> torch.Tensor:
        """int64 sample indices (into ``folder.files``) this rank visits in ``epoch``, in order
        (training: from global position ``start_sample`` on; evaluation: the whole shard)."""
        return shard_indices(self.num_samples, self.batch_size, self.rank, self.world_size,
                             train=self.train, seed=self.seed, epoch=epoch, start_sample=start_sample)

    def _order(self, epoch: int, start_sample: int, start_batch: int) -> torch.Tensor:
        """The sample indices one iteration yields, in order (cut into batches of B; in
        evaluation the last one may be smaller)."""
        if self.train:
            return self.indices(epoch, start_sample)
        return self.indices(epoch)[start_batch * self.batch_size:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate the current epoch from where ``set_epoch`` put it; the next iteration starts
        at the epoch's beginning."""
        epoch, start_sample, start_batch = self.epoch, self.start_sample, self.start_batch
        self.start_sample = self.start_batch = 0  # reset now: an abandoned iteration does not leak
        return self._batches(epoch, start_batch, self._order(epoch, start_sample, start_batch))

    def _batches(self, epoch: int, start_batch: int,
                 order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``order`` (from ``_order``) as batches; ``start_batch``: the epoch's index of
        the first one."""
        raise NotImplementedError

    def batch_paths(self, epoch: int, batches: range) -> list[Path]:
        """Files of this rank's batches ``batches`` of ``epoch`` (for error reports)."""
        order = self.indices(epoch)
        b = self.batch_size
        sel = order[batches.start * b: batches.stop * b].tolist()
        return [self.folder.path(i) for i in sel]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.folder.root}, {len(self)} batches of {self.batch_size}, "
                f"rank {self.rank}/{self.world_size}, {'train' if self.train else 'eval'})")


# ---------------------------------------------------------------------------------------------
# torchvision: decode_jpeg + transforms.v2 on tensors, in DataLoader workers


def random_resized_crop_box(height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's ``RandomResizedCrop`` (scale 0.08-1, ratio 3/4-4/3),
    drawn from ``rng`` instead of the global torch RNG: 10 attempts, then a centre crop with
    the aspect ratio clamped into the range."""
    area = height * width
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def decode_file(path: Path) -> torch.Tensor:
    """uint8 (3, H, W) RGB: ``torchvision.io.decode_jpeg``, PIL for what it refuses.

    Raises ``ValueError`` naming the file if neither can decode it.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except OSError as err:
        raise bad_file_error(path, f"unreadable: {err.strerror or err}") from None
    if data.numel() == 0:
        raise bad_file_error(path, "empty file")
    try:
        # torchvision 0.29 deprecates its codecs for TorchCodec and warns on every call;
        # decode_jpeg is still the fastest CPU JPEG decoder it ships.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB)
    except Exception:  # noqa: BLE001 - not a (supported) JPEG: CMYK on old builds, PNG, ...
        pass
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except Exception as err:  # noqa: BLE001
        raise bad_file_error(path, f"not a decodable image ({_pil_reason(err, path)})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


class _DecodeCrop(torch.utils.data.Dataset):
    """Sample ``(epoch, index)`` -> (uint8 (3, S, S), label); a bad file -> its error message.

    The error travels back as a string so that the main process raises one clean
    ``ValueError`` (a worker's exception would arrive wrapped in a multi-line traceback).
    """

    def __init__(self, folder: ImageFolder, size: int, augment: bool, seed: int) -> None:
        self.folder, self.size, self.augment, self.seed = folder, size, augment, seed
        self.labels = folder.labels.tolist()

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]):
        from torchvision.transforms.v2 import functional as tvf

        epoch, i = key
        try:
            img = decode_file(self.folder.path(i))
        except ValueError as err:
            return str(err)
        s = self.size
        if self.augment:
            rng = random.Random(derive_seed(self.seed, _AUGMENT, epoch, i))
            top, left, h, w = random_resized_crop_box(img.shape[1], img.shape[2], rng)
            img = tvf.resized_crop(img, top, left, h, w, [s, s], antialias=True)
            if rng.random() < 0.5:
                img = tvf.horizontal_flip(img)
        else:
            img = tvf.center_crop(tvf.resize(img, [val_resize(s)], antialias=True), [s, s])
        return img, self.labels[i]


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # workers already run in parallel; intra-op threads oversubscribe


def normalise(x: torch.Tensor, fp16: bool = False, channels_last: bool = False) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> (x / 255 - mean) / std as float32 (float16 with ``fp16``), on
    x's device, in channels_last memory format with ``channels_last``. A new tensor."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    mul = (1 / (255 * std)).float().to(x.device)
    add = (-mean / std).float().to(x.device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=layout)
    out.copy_(x).mul_(mul).add_(add)  # one conversion pass, then in place (no temporaries)
    return out.half() if fp16 else out


class _Collate:
    """Stack a batch of (uint8 image, label); a bad file's message (str) passes through.

    With ``normalise_here`` (CPU loaders) the batch is normalised in the worker that
    assembles it, in parallel with the other workers, so the training process only receives
    it; GPU loaders get uint8 (4x less to copy) and normalise after the copy.
    """

    def __init__(self, normalise_here: bool, fp16: bool, channels_last: bool) -> None:
        self.normalise_here, self.fp16, self.channels_last = normalise_here, fp16, channels_last

    def __call__(self, samples: list):
        for s in samples:
            if isinstance(s, str):
                return s
        x = torch.stack([s[0] for s in samples])
        y = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        if self.normalise_here:
            x = normalise(x, self.fp16, self.channels_last)
        return x, y


class TorchvisionLoader(ImageNetLoader):
    """``decode_jpeg`` + ``transforms.v2`` in ``num_workers`` DataLoader workers (0: in this
    process), which also stack and normalise each batch. With ``gpu``, batches travel as uint8
    (pinned, 4x less to copy) and are normalised on the GPU."""

    backend = "torchvision"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dataset = _DecodeCrop(self.folder, self.image_size, self.augment, self.seed)

    def _batches(self, epoch: int, start_batch: int,
                 order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = order.tolist()
        if not order:
            return
        workers = self.num_workers
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=[(epoch, i) for i in order],
            num_workers=workers, collate_fn=_Collate(not self.gpu, self.fp16_output, self.channels_last),
            pin_memory=self.gpu, worker_init_fn=_one_thread if workers else None,
            prefetch_factor=4 if workers else None,
        )
        device = torch.device("cuda", torch.cuda.current_device()) if self.gpu else None
        for batch in loader:
            if isinstance(batch, str):
                raise ValueError(batch)
            x, y = batch
            if device is not None:
                x = normalise(x.to(device, non_blocking=True), self.fp16_output, self.channels_last)
                y = y.to(device, non_blocking=True)
            yield x, y


# ---------------------------------------------------------------------------------------------
# Choosing the pipeline and building the loaders


def dali_available() -> tuple[bool, str]:
    """(True, version) if NVIDIA DALI and its PyTorch plugin import, else (False, why)."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken CUDA library under it
        return False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return True, dali.__version__


def resolve_loader(name: str) -> str:
    """``--loader`` -> ``dali`` or ``torchvision`` (``auto``: DALI if it imports)."""
    if name == "torchvision":
        return name
    ok, why = dali_available()
    if name == "dali" and not ok:
        raise ValueError(f"--loader dali: NVIDIA DALI cannot be imported ({why}); install it with "
                         f"pip install -e '.[dali]' or pass --loader torchvision")
    if name not in ("auto", "dali"):
        raise ValueError(f"--loader {name!r}: choose auto, dali or torchvision")
    return "dali" if ok else "torchvision"


def use_gpu(decode_device: str) -> bool:
    """Whether batches end on this process's GPU (DALI "mixed" decoding; torchvision normalises there).

    ``auto``: when CUDA is available, unless an Accelerator of this process runs on the CPU
    (``--device cpu``, ``ACCELERATE_USE_CPU``). The GPU is ``torch.cuda.current_device()``,
    which Accelerate sets to the local rank's.
    """
    cuda = torch.cuda.is_available()
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        cuda = False
    try:
        from accelerate.state import PartialState

        if PartialState._shared_state:  # an Accelerator exists: follow its device
            cuda = cuda and PartialState().device.type == "cuda"
    except ImportError:
        pass
    if decode_device == "gpu" and not cuda:
        raise ValueError("--decode-device gpu: CUDA is not available to this process")
    return cuda and decode_device != "cpu"


@register_loaders("imagenet")
def build_imagenet(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> Loaders:
    """The ImageNet loaders of global ``rank``: train, no separate validation split (``val``
    None), and the ``val/`` folder as ``test`` (there is no labelled test set)."""
    if cfg.valid_split:
        raise ValueError(f"--valid-split {cfg.valid_split}: not supported for imagenet; its val/ "
                         f"split is the evaluation set")
    backend = resolve_loader(cfg.loader)  # before listing 1.28M files
    gpu = use_gpu(cfg.decode_device)
    train = scan_split(cfg.data_dir, "train")
    val = scan_split(cfg.data_dir, "val", classes=train.classes)
    if len(train) // world_size < cfg.batch_size:
        raise ValueError(f"--batch-size: {cfg.batch_size} per process x {world_size} processes exceeds "
                         f"the {len(train)} training images; use a smaller batch")
    if backend == "dali":
        from .dali import DaliLoader as cls
    else:
        cls = TorchvisionLoader
    common = dict(image_size=cfg.image_size, seed=seed, rank=rank, world_size=world_size,
                  fp16_output=cfg.fp16_output, channels_last=cfg.channels_last,
                  num_workers=cfg.num_workers, gpu=gpu)
    log.info("imagenet: %d train / %d val images, %d classes, %s loader%s", len(train), len(val),
             len(train.classes), backend, " (GPU decoding)" if gpu and backend == "dali" else "")
    return Loaders(
        train=cls(train, cfg.batch_size, train=True, augment=cfg.augment, **common),
        val=None,
        test=cls(val, cfg.test_batch_size, train=False, **common),
        num_classes=len(train.classes),
        input_shape=(3, cfg.image_size, cfg.image_size),
    )
