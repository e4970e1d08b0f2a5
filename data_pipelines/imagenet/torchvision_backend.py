"""The torchvision pipeline (``--loader torchvision``): ``decode_file`` + ``transforms.v2``
functionals on uint8 tensors in DataLoader workers; the fallback where DALI is not installed,
and the comparison point. Each sample's crop and flip are drawn from a generator seeded by
(seed, epoch, sample), so a resumed epoch is identical to an uninterrupted one."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Iterator

import torch

from ..errors import DataError
from ..sharding import derive_seed
from .checks import bad_file_error
from .decode import decode_file
from .folder import ImageFolder
from .loader import CROP_ATTEMPTS, IMAGENET_MEAN, IMAGENET_STD, RATIO, SCALE, ImageNetLoader, val_resize

__all__ = ["TorchvisionLoader", "normalise", "random_resized_crop_box"]

# derive_seed stream tag of the per-sample crop and flip.
_AUGMENT = 11


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


def _accelerator_device() -> torch.device:
    """This process's current accelerator device (``torch.accelerator``: CUDA here), where GPU
    loaders normalise their batches."""
    return torch.device(torch.accelerator.current_accelerator().type, torch.accelerator.current_device_index())


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

    def _batches(self, epoch: int, first: int, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
        # torch's device-agnostic accessor (this process's GPU under Accelerate), not CUDA's own
        device = _accelerator_device() if self.gpu else None
        for batch in loader:
            if isinstance(batch, str):  # a file that failed, in a worker or here
                raise DataError(batch)
            x, y = batch
            if device is not None:
                x = normalise(x.to(device, non_blocking=True), self.fp16_output, self.channels_last)
                y = y.to(device, non_blocking=True)
            yield x, y

