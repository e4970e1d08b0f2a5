"""ImageNet from the standard folder layout, read batch by batch: NVIDIA DALI or torchvision.

``--data imagenet --data-dir ROOT`` reads ``ROOT/train/<wnid>/*.JPEG`` and
``ROOT/val/<wnid>/*.JPEG`` (the validation images sorted into class folders, as the usual
``valprep.sh`` does). Class index = position of the wnid in the sorted list of ``train/``
folders, for both splits. ``--loader`` picks the pipeline:

* ``dali`` (``data_pipelines.dali``): NVIDIA DALI; fused decode + random-resized-crop
  (``decoders.image_random_crop`` decodes only the crop), on the GPU ("mixed") when CUDA is
  available, else a CPU pipeline (``device_id=None``); DALI prefetches batches in its own
  threads.
* ``torchvision``: ``torchvision.io.decode_jpeg`` / ``decode_png`` + ``transforms.v2``
  functionals on uint8 tensors in DataLoader workers (PIL for CMYK JPEGs and other formats
  renamed .JPEG). The fallback where DALI is not installed, and the comparison point.
* ``auto`` (default): DALI if it imports, else torchvision.

Both decode every image a folder can hold to the same 8-bit RGB pixels (``decode_file``,
``to_rgb8``: DALI's rules for 16-bit, float, CMYK, YCbCr, palette and alpha images).

Bad files: every error about the data is a one-line ``DataError`` (a ``ValueError``) naming
the file or folder, raised while listing (``scan_split``), by the pre-flight
(``check_files``: headers only; the trainer runs it over the evaluation split before
training, and over the training split with ``--check-data``), and by either pipeline while
it iterates: a DataLoader worker sends its failure back as text, DALI's failures are traced
to the file (PIL decodes the batches in flight, then DALI decodes them one by one).

Both apply the reference augmentation (docs/algorithms.md §6.6): training RandomResizedCrop to
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
from .errors import DataError
from .loader import check_start_sample, derive_seed, train_batches, train_shard
from .registry import register_loaders

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFolder",
    "ImageNetLoader",
    "TorchvisionLoader",
    "build_imagenet",
    "check_file",
    "check_files",
    "dali_available",
    "decode_file",
    "find_undecodable",
    "random_resized_crop_box",
    "resolve_loader",
    "scan_split",
    "shard_indices",
    "to_rgb8",
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
    be among them; labels follow that list). Raises a one-line ``DataError`` naming the
    folder or file for: a missing root or split, a root or split that is a file, a folder
    that cannot be listed (permissions), files lying directly in the split folder (an
    unsorted validation set), no class folders, an empty class folder, a file that is not an
    image (by suffix: .JPEG/.jpg/.jpeg/.png), a sub-folder inside a class folder, and a
    validation class folder that ``train/`` lacks. Hidden files (``.name``) are skipped.
    Files are not opened here (1.28M opens would take minutes on a network file system):
    ``check_files`` reads their headers (the trainer's pre-flight), and the pipelines name a
    file they fail to decode.
    """
    root = Path(data_dir)
    where = f"--data-dir {data_dir}"
    layout = f"expected {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG"
    if root.exists() and not root.is_dir():
        raise DataError(f"{where}: {root} is a file, not a folder; {layout}")
    if not root.is_dir():
        raise DataError(f"{where}: no such folder; {layout}")
    folder = root / split
    if folder.exists() and not folder.is_dir():
        raise DataError(f"{where}: {folder} is a file, not a folder; {layout}")
    if not folder.is_dir():
        raise DataError(f"{where}: the {split} split is missing: no folder {folder}; {layout}")
    dirs, loose = [], []
    for entry in _list(folder, where):
        if entry.name.startswith("."):
            continue
        (dirs if entry.is_dir() else loose).append(entry.name)
    if loose:
        first = folder / sorted(loose)[0]
        raise DataError(f"{where}: {first} lies directly in {folder}; images must sit in class "
                        f"folders, {split}/<wnid>/*.JPEG (sort the validation images into "
                        f"class folders first)")
    if not dirs:
        raise DataError(f"{where}: {folder} has no class folders; {layout}")
    dirs.sort()
    if classes is None:
        classes = tuple(dirs)
    else:
        unknown = [d for d in dirs if d not in set(classes)]
        if unknown:
            raise DataError(f"{where}: class folder {folder / unknown[0]} has no counterpart in "
                            f"{root / 'train'}; both splits must use the training classes")
    index = {name: i for i, name in enumerate(classes)}
    files: list[str] = []
    labels: list[int] = []
    for name in dirs:
        class_dir = folder / name
        found = []
        for entry in _list(class_dir, where):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                raise DataError(f"{where}: {class_dir / entry.name} is a folder; class folders "
                                f"must hold image files only")
            if not entry.name.lower().endswith(IMAGE_SUFFIXES):
                raise DataError(f"{where}: {class_dir / entry.name} is not an image file "
                                f"(expected {', '.join(IMAGE_SUFFIXES)}); remove it")
            found.append(entry.name)
        if not found:
            raise DataError(f"{where}: class folder {class_dir} holds no images")
        found.sort()
        files += [f"{name}/{f}" for f in found]
        labels += [index[name]] * len(found)
    return ImageFolder(folder, tuple(classes), tuple(files), torch.tensor(labels, dtype=torch.int64))


def _list(folder: Path, where: str) -> list[os.DirEntry]:
    """The entries of ``folder``; a ``DataError`` naming it if it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as err:
        raise DataError(f"{where}: cannot list {folder}: {err.strerror or err}") from None


def find_undecodable(paths: list[Path]) -> tuple[Path, str] | None:
    """The first of ``paths`` that cannot be read or fully decoded, with why; None if all can.

    Used after a pipeline failed on a batch (DALI's errors do not name the file): each file
    is opened and decoded completely by PIL (truncated files fail too). Files that PIL
    decodes but DALI does not are found by ``data_pipelines.dali.find_dali_undecodable``.
    """
    from PIL import Image

    for path in paths:
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as err:
            return path, unreadable_reason(path, err)
        if not head:
            return path, "empty file"
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as err:  # noqa: BLE001 - PIL raises many kinds; all mean "not an image"
            return path, f"not a decodable image ({_pil_reason(err, path)})"
    return None


def unreadable_reason(path: Path, err: OSError) -> str:
    """Why ``path`` could not be opened, in a few words (a dangling symlink says so)."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"a broken symbolic link (to {os.readlink(path)})"
    return f"unreadable: {err.strerror or err}"


def _pil_reason(err: Exception, path: Path) -> str:
    """PIL's message, first line, without the path it repeats."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text.replace(f" '{path}'", "").replace(f" {path}", "") or type(err).__name__


def bad_file_error(path: Path, why: str) -> DataError:
    """The one-line error of both pipelines (and the pre-flight) for a file they cannot use."""
    return DataError(f"--data-dir: cannot decode {path}: {why}; remove or replace the file")


# ---------------------------------------------------------------------------------------------
# The pre-flight: headers only (the trainer calls it before training, data_pipelines.check_loaders)

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# PIL's names of the formats NVIDIA DALI decodes (nvImageCodec; PPM covers PBM/PGM/PPM).
DALI_FORMATS = frozenset({"JPEG", "MPO", "PNG", "TIFF", "BMP", "PPM", "WEBP", "JPEG2000"})
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (DHT, JPG, DAC are not)
_HEAD = 4096  # first read of a file: a JPEG's markers up to its scan fit, usually


def check_file(path: Path, dali: bool = False) -> str | None:
    """Why the loaders cannot use ``path`` (a few words), or None if its header looks right.

    Reads headers, never decodes: a JPEG's markers up to its first scan (frame header with a
    non-zero size) and its end-of-image marker (the last two bytes; trailing bytes after it
    are tolerated); a PNG's IHDR chunk and its IEND chunk; any other format is opened by PIL
    (``Image.open`` parses the header only). Finds empty, unreadable, truncated and non-image
    files (text under a ``.JPEG`` name), dangling symlinks, and with ``dali`` formats NVIDIA
    DALI cannot decode (GIF, PFM, 32-bit integer and 2-channel TIFFs, which DALI rejects or
    decodes wrongly). A file corrupt inside its compressed data passes; the pipelines name
    it when they fail on it.
    """
    try:
        with open(path, "rb", buffering=0) as f:  # unbuffered: each read is one exact system call
            size = os.fstat(f.fileno()).st_size
            head = f.read(_HEAD)
            if not head:
                return "empty file"
            if head.startswith(JPEG_MAGIC):
                return _jpeg_problem(f, head, size)
            if head.startswith(PNG_MAGIC):
                return _png_problem(f, head, size)
    except OSError as err:
        return unreadable_reason(path, err)
    from PIL import Image

    try:
        with Image.open(path) as img:
            fmt, mode, tags = img.format, img.mode, dict(getattr(img, "tag_v2", {}) or {})
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds; all mean "not an image"
        return f"not a decodable image ({_pil_reason(err, path)})"
    if dali:
        what = _dali_refuses(fmt, mode, tags)
        if what:
            return f"{what} (convert it to JPEG, or use --loader torchvision, which reads it)"
    return None


def _dali_refuses(fmt: str | None, mode: str, tags: dict) -> str | None:
    """What DALI cannot decode (correctly) among the images PIL opens, judged by the header."""
    cannot = "which NVIDIA DALI cannot decode"
    if fmt not in DALI_FORMATS:
        return f"a {fmt or 'non-JPEG'} image, {cannot}"
    if fmt == "PPM" and mode == "F":
        return f"a PFM (floating-point) image, {cannot}"
    if fmt == "TIFF":
        if mode in ("I", "I;32", "I;32S", "I;32N"):
            return f"a 32-bit integer TIFF, {cannot}"
        if mode in ("LA", "PA", "La"):  # DALI returns the samples regrouped as 3 channels
            return "a 2-channel (gray or palette + alpha) TIFF, which NVIDIA DALI decodes wrongly"
        if 258 not in tags:  # BitsPerSample: PIL omits it for 1-bit images, DALI requires it
            return f"a TIFF without a BitsPerSample tag, {cannot}"
    return None


def _jpeg_problem(f, head: bytes, size: int) -> str | None:
    """Walk the markers of the JPEG open in ``f`` (its first bytes: ``head``) from SOI to its
    first SOS (start of scan), then look for its end-of-image marker."""
    buf = bytearray(head)

    def have(n: int) -> bool:  # at least n bytes read (reads on: headers with big EXIF/ICC)
        while len(buf) < n:
            more = f.read(max(_HEAD, n - len(buf)))
            if not more:
                return False
            buf.extend(more)
        return True

    pos, frame = 2, False
    while True:
        if not have(pos + 4):
            return "truncated JPEG (it ends inside its header)"
        if buf[pos] != 0xFF:
            return f"corrupt JPEG header (no marker at byte {pos})"
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: the compressed data follows
            break
        if marker == 0xD9:
            return "corrupt JPEG (it ends before its image data)"
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        if length < 2:
            return f"corrupt JPEG header (bad segment length at byte {pos})"
        if marker in _SOF:
            if not have(pos + 9):
                return "truncated JPEG (it ends inside its header)"
            height, width = (buf[pos + 5] << 8) | buf[pos + 6], (buf[pos + 7] << 8) | buf[pos + 8]
            if not height or not width:
                return f"corrupt JPEG header (image size {width} x {height})"
            frame = True
        pos += 2 + length
    if not frame:
        return "corrupt JPEG header (no frame header before the image data)"
    f.seek(size - 2)
    if f.read(2) == b"\xff\xd9":
        return None
    f.seek(pos)  # bytes after the end-of-image marker? (0xFFD9 cannot occur inside the scans)
    if b"\xff\xd9" in f.read():
        return None
    return "truncated JPEG (no end-of-image marker after its image data)"


def _png_problem(f, head: bytes, size: int) -> str | None:
    """The PNG open in ``f``: an IHDR chunk first, with a non-zero size; an IEND chunk at the end."""
    if len(head) < 24 or head[12:16] != b"IHDR":
        return "corrupt PNG header (no IHDR chunk)"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if not width or not height:
        return f"corrupt PNG header (image size {width} x {height})"
    f.seek(max(0, size - 1024))
    if b"IEND" not in f.read():
        return "truncated PNG (no IEND chunk at its end)"
    return None


def check_files(folder: ImageFolder, *, dali: bool = False, rank: int = 0, world_size: int = 1,
                threads: int = 8) -> int:
    """Pre-flight of a split: ``check_file`` on its files ``rank``, ``rank + world_size``, ...
    (all of them by default); returns how many were checked.

    Raises a one-line ``DataError`` naming the first bad file (in the split's sorted order).
    ``threads`` runs of 64 files are read at a time (I/O bound: a network file system answers
    many requests at once). 2 000 JPEGs of 70 KB from the page cache: 0.1-0.3 s on a busy
    2-core CPU (50-150 us a file), so ImageNet's 50 000 validation images take seconds.
    """
    from concurrent.futures import ThreadPoolExecutor

    paths = [folder.root / f for f in folder.files[rank::world_size]]

    def first_bad(start: int) -> tuple[Path, str] | None:  # a task: 64 files in a row
        for path in paths[start:start + 64]:
            why = check_file(path, dali)
            if why is not None:
                return path, why
        return None

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for block in range(0, len(paths), 64 * 256):  # never 20 000 futures at once
            for bad in pool.map(first_bad, range(block, min(block + 64 * 256, len(paths)), 64)):
                if bad is not None:
                    raise bad_file_error(*bad)
    return len(paths)


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

    def check_files(self, *, shard: bool = False) -> int:
        """Pre-flight of this loader's split (``check_files``: headers, no decoding, as this
        backend reads them); ``shard``: only this rank's 1/W of the files (rank, rank + W, ...).
        Returns the files checked; raises ``DataError`` naming the first bad one."""
        w = self.world_size if shard else 1
        return check_files(self.folder, dali=self.backend == "dali", rank=self.rank % w, world_size=w)

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
    """uint8 (3, H, W) RGB, the pixels NVIDIA DALI's decoder (``output_type=RGB``) gives.

    JPEG: ``torchvision.io.decode_jpeg`` (libjpeg-turbo, DALI's CPU decoder too: equal
    pixels; grayscale replicated); CMYK/YCCK JPEGs go to PIL and ``to_rgb8``'s CMYK rule
    (decode_jpeg's own CMYK conversion rounds differently). PNG: ``decode_png`` (libpng),
    16-bit samples scaled as DALI does (``to_rgb8``). Anything else (or what those refuse): PIL
    and ``to_rgb8``. Raises ``DataError`` naming the file if none can decode it.
    """
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    try:
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except OSError as err:
        raise bad_file_error(path, unreadable_reason(path, err)) from None
    if data.numel() == 0:
        raise bad_file_error(path, "empty file")
    head = data[:8].numpy().tobytes()
    try:
        # torchvision 0.29 deprecates its codecs for TorchCodec and warns on every call;
        # decode_jpeg is still the fastest CPU JPEG decoder it ships.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if head.startswith(JPEG_MAGIC):
                img = decode_jpeg(data, mode=ImageReadMode.UNCHANGED)
                if img.shape[0] == 3:
                    return img
                if img.shape[0] == 1:
                    return img.expand(3, -1, -1).contiguous()
            elif head.startswith(PNG_MAGIC):
                img = decode_png(data, mode=ImageReadMode.RGB)
                return img if img.dtype == torch.uint8 else _to8(img.to(torch.int32))
    except Exception:  # noqa: BLE001 - not decodable by torchvision: PIL decides below
        pass
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = np.require(to_rgb8(img), requirements="W")  # PIL's arrays are read-only
    except Exception as err:  # noqa: BLE001
        raise bad_file_error(path, f"not a decodable image ({_pil_reason(err, path)})") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _to8(x):
    """16-bit samples (any integer array or tensor) to 8 bits as DALI does: round(v * 255 / 65535)
    (v / 257 rounded; never a tie), after clipping to 0..65535."""
    lib = torch if isinstance(x, torch.Tensor) else np
    v = lib.clip(x.astype(np.int64) if lib is np else x, 0, 65535)
    out = (v * 255 + 32767) // 65535
    return out.to(torch.uint8) if lib is torch else out.astype(np.uint8)


def to_rgb8(img) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a PIL image of any mode, converted as NVIDIA DALI converts the
    same file (``fn.decoders.image``, ``output_type=RGB``; checked pixel for pixel on DALI 2.4's
    CPU decoder, tests/test_imagenet.py):

    * alpha is dropped, never composited (RGBA, LA, PA); gray is replicated to 3 channels;
      palettes (P) are looked up; 1-bit images give 0 and 255: PIL's ``convert("RGB")``;
    * 16-bit samples (I;16*, and I, which PIL gives 16-bit PGM/TIFF/PNG data): v -> round(v *
      255 / 65535) = (v * 255 + 32767) // 65535, after clipping to 0..65535 (PIL's own
      conversion clips: 40 000 would be white instead of 156); a TIFF's 16-bit palette is
      scaled the same way;
    * F (32-bit float, 0..1 = black..white): floor(clip(v * 255, 0, 255) + 0.5) in float32;
    * CMYK (ink amounts, Adobe's inversion undone by PIL): R = (255 - K) * (255 - C) // 255,
      truncated, likewise G from M and B from Y (PIL rounds);
    * YCbCr (TIFF): libtiff's ``TIFFYCbCrtoRGB`` with the file's YCbCrCoefficients and
      ReferenceBlackWhite (DALI decodes these through OpenCV's libtiff; PIL's formula differs
      by 1). JPEG's YCbCr never reaches PIL here (``decode_file`` uses libjpeg-turbo).

    DALI itself departs from any sensible reading for 2-channel TIFFs (LA, PA: it returns the
    samples regrouped as 3 channels), and cannot decode GIF, PFM, 32-bit integer TIFFs, TIFFs
    without BitsPerSample or JPEG 2000 with alpha/CMYK; those are PIL's ``convert("RGB")``
    (the first ones) here, and a ``DataError`` naming the file from the DALI loader.
    """
    m = img.mode
    if m == "I" or m.startswith("I;16"):
        return np.repeat(_to8(np.asarray(img))[..., None], 3, axis=2)
    if m == "F":
        v = np.nan_to_num(np.asarray(img, dtype=np.float32)) * np.float32(255)
        gray = np.floor(np.clip(v, 0, 255) + np.float32(0.5)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if m == "CMYK":
        cmyk = np.asarray(img).astype(np.int32)
        return ((255 - cmyk[..., 3:]) * (255 - cmyk[..., :3]) // 255).astype(np.uint8)
    if m == "YCbCr":
        return _ycbcr_to_rgb(np.asarray(img), dict(getattr(img, "tag_v2", {}) or {}))
    if m == "P" and img.format == "TIFF" and 320 in getattr(img, "tag_v2", {}):
        colormap = np.asarray(img.tag_v2[320], dtype=np.int64).reshape(3, -1).T  # 16-bit entries
        return _to8(colormap)[np.asarray(img)]
    return np.asarray(img.convert("RGB"))


def _ycbcr_to_rgb(ycc: np.ndarray, tags: dict) -> np.ndarray:
    """libtiff's TIFFYCbCrToRGBInit + TIFFYCbCrtoRGB (tif_color.c): fixed point, 16 bits.

    Tags 529 (YCbCrCoefficients, default ITU-R BT.601) and 532 (ReferenceBlackWhite)."""
    f32 = np.float32
    red, green, blue = (f32(v) for v in tags.get(529, (0.299, 0.587, 0.114)))
    black_white = [f32(v) for v in tags.get(532, (0, 255, 128, 255, 128, 255))]
    shift, half = 16, 1 << 15

    def fix(x) -> int:
        return int(float(x) * (1 << shift) + 0.5)

    def code2v(c, black, white, rng):
        return (c - black) * f32(rng) / (white - black if white != black else f32(1))

    f1 = f32(2) - f32(2) * red
    f2 = red * f1 / green
    f3 = f32(2) - f32(2) * blue
    f4 = blue * f3 / green
    d1, d2, d3, d4 = fix(np.clip(f1, 0, 2)), -fix(np.clip(f2, 0, 2)), fix(np.clip(f3, 0, 2)), -fix(np.clip(f4, 0, 2))
    x = np.arange(-128, 128).astype(f32)
    cr = np.clip(code2v(x, black_white[4] - 128, black_white[5] - 128, 127), -4096, 4096).astype(np.int64)
    cb = np.clip(code2v(x, black_white[2] - 128, black_white[3] - 128, 127), -4096, 4096).astype(np.int64)
    y_tab = np.clip(code2v(x + 128, black_white[0], black_white[1], 255), -4096, 4096).astype(np.int64)
    y, cb_i, cr_i = y_tab[ycc[..., 0]], ycc[..., 1], ycc[..., 2]
    r = y + ((d1 * cr + half) >> shift)[cr_i]
    g = y + (((d4 * cb + half)[cb_i] + (d2 * cr)[cr_i]) >> shift)
    b = y + ((d3 * cb + half) >> shift)[cb_i]
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


class _DecodeCrop(torch.utils.data.Dataset):
    """Sample ``(epoch, index)`` -> (uint8 (3, S, S), label); a bad file -> its error message.

    Whatever fails for a sample (decoding, or anything after it) travels back as a string
    naming the file, so that the main process raises one clean ``DataError`` (a worker's
    exception would arrive wrapped in a multi-line traceback).
    """

    def __init__(self, folder: ImageFolder, size: int, augment: bool, seed: int) -> None:
        self.folder, self.size, self.augment, self.seed = folder, size, augment, seed
        self.labels = folder.labels.tolist()

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        path = self.folder.path(i)
        try:
            return self._sample(path, epoch, i), self.labels[i]
        except DataError as err:
            return str(err)
        except Exception as err:  # noqa: BLE001 - any other failure on this file, named
            text = str(err).strip().splitlines()
            return str(bad_file_error(path, f"{type(err).__name__}: {text[0] if text else ''}"))

    def _sample(self, path: Path, epoch: int, i: int) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as tvf

        img = decode_file(path)
        s = self.size
        if self.augment:
            rng = random.Random(derive_seed(self.seed, _AUGMENT, epoch, i))
            top, left, h, w = random_resized_crop_box(img.shape[1], img.shape[2], rng)
            img = tvf.resized_crop(img, top, left, h, w, [s, s], antialias=True)
            if rng.random() < 0.5:
                img = tvf.horizontal_flip(img)
        else:
            img = tvf.center_crop(tvf.resize(img, [val_resize(s)], antialias=True), [s, s])
        return img


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
            if isinstance(batch, str):  # a file that failed, in a worker or here
                raise DataError(batch)
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
        raise DataError(f"--loader dali: NVIDIA DALI cannot be imported ({why}); install it with "
                         f"pip install -e '.[dali]' or pass --loader torchvision")
    if name not in ("auto", "dali"):
        raise DataError(f"--loader {name!r}: choose auto, dali or torchvision")
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
        raise DataError(f"--valid-split {cfg.valid_split}: not supported for imagenet; its val/ "
                         f"split is the evaluation set")
    backend = resolve_loader(cfg.loader)  # before listing 1.28M files
    gpu = use_gpu(cfg.decode_device)
    train = scan_split(cfg.data_dir, "train")
    val = scan_split(cfg.data_dir, "val", classes=train.classes)
    if len(train) // world_size < cfg.batch_size:
        raise DataError(f"--batch-size: {cfg.batch_size} per process x {world_size} processes exceeds "
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
