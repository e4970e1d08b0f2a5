"""The built-in datasets: MNIST, CIFAR-10/100 (torchvision), scikit-learn digits, synthetic.

The torchvision ones are read by torchvision's own dataset classes from its on-disk format
under ``--data-dir`` and kept as uint8 tensors; preprocessing follows docs/algorithms.md §6.6 (REF).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchvision import datasets as tvd
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import check_integrity

from .config import DataConfig
from .errors import DataError
from .registry import DATASETS, DatasetInfo, DatasetSpec, register_dataset
from .transforms import CropFlip

# file name -> "is this file intact?" (only called on files that exist)
FileChecks = dict[str, Callable[[Path], bool]]
Tensors = tuple[torch.Tensor, torch.Tensor]

DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_TEST_SIZE = 256


# ---------------------------------------------------------------------------------------------
# torchvision datasets


def _md5_checks(files: list[list[str]]) -> FileChecks:
    """Each file against the md5 that torchvision lists for it."""
    return {name: (lambda path, md5=md5: check_integrity(str(path), md5)) for name, md5 in files}


def _parses(reader: Callable[[str], torch.Tensor]) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        try:
            reader(str(path))
        except Exception:  # torchvision's idx reader fails with assorted errors on bad bytes
            return False
        return True

    return check


def _files(cls: type[tvd.VisionDataset]) -> tuple[str, FileChecks]:
    """The folder (relative to the root) where ``cls`` reads its files, and how to check each."""
    if issubclass(cls, tvd.CIFAR10):
        meta = [[cls.meta["filename"], cls.meta["md5"]]]
        return cls.base_folder, _md5_checks(cls.train_list + cls.test_list + meta)
    if issubclass(cls, tvd.MNIST):
        # torchvision has md5s only of the .gz archives; check that the idx files parse.
        names = [os.path.splitext(name)[0] for name, _ in cls.resources]
        checks = {n: _parses(read_image_file if "images" in n else read_label_file) for n in names}
        return f"{cls.__name__}/raw", checks
    raise TypeError(f"no file list for {cls.__name__}")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _as_tensors(ds: tvd.VisionDataset) -> Tensors:
    """torchvision's ``.data`` (N, H, W) or (N, H, W, C) -> uint8 (N, C, H, W); targets int64."""
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)


def load_torchvision(cls: type[tvd.VisionDataset], cfg: DataConfig, title: str) -> tuple[Tensors, Tensors]:
    """(train, test) tensors of torchvision dataset ``cls`` (CIFAR10/100, MNIST) under ``cfg.data_dir``.

    Each split is (x uint8 (N, C, H, W), y int64 (N,)). Errors are one-line ``DataError``s
    naming the folder (files missing) or the file (corrupt) and the fix.
    """
    root = cfg.data_dir
    if Path(root).exists() and not Path(root).is_dir():
        raise DataError(f"--data-dir {root}: {root} is a file, not a folder; pass the folder that "
                        f"holds (or is to hold) {title}")
    subfolder, checks = _files(cls)
    folder = Path(root) / subfolder
    fix = (f"check the internet connection, or put torchvision's {title} in that folder" if cfg.download
           else f"put torchvision's {title} in that folder or pass --download")
    if not cfg.download:
        missing = [n for n in checks if not (folder / n).is_file()]
        if len(missing) == len(checks):
            raise DataError(f"--data-dir {root}: no {title} files ({subfolder}) there; {fix}")
        if missing:
            raise DataError(f"--data-dir {root}: {title} files missing in {folder}: "
                            f"{', '.join(missing)}; {fix}")
    try:
        train, test = (_as_tensors(cls(root=root, train=t, download=cfg.download)) for t in (True, False))
    except Exception as err:  # torchvision raises RuntimeError, pickle/idx errors, URLError, ...
        bad = next((folder / n for n, ok in checks.items() if (folder / n).is_file() and not ok(folder / n)), None)
        if bad is not None:
            raise DataError(f"--data-dir {root}: {title} file {bad} is corrupt; "
                            f"replace it with torchvision's (or delete it and pass --download)") from None
        raise DataError(f"--data-dir {root}: cannot load {title} from {folder} ({_one_line(err)}); {fix}") from err
    return train, test


@register_dataset("mnist")
def mnist(cfg: DataConfig) -> DatasetSpec:
    """MNIST 60 000/10 000, (1, 28, 28); REF: 54 000/6 000 train/val, no augmentation."""
    train, test = load_torchvision(tvd.MNIST, cfg, "MNIST")
    return DatasetSpec(*train, *test, info=DATASETS["mnist"], mean=(0.1307,), std=(0.3081,), valid_split=0.1)


@register_dataset("cifar10")
def cifar10(cfg: DataConfig) -> DatasetSpec:
    """CIFAR-10 50 000/10 000; REF: 45 000/5 000 train/val, reflect-pad-4 crop + flip."""
    train, test = load_torchvision(tvd.CIFAR10, cfg, "CIFAR-10")
    return DatasetSpec(*train, *test, info=DATASETS["cifar10"], mean=(0.4914, 0.4822, 0.4465),
                       std=(0.2023, 0.1994, 0.2010), augment=CropFlip(4, "reflect"), valid_split=0.1)


@register_dataset("cifar100")
def cifar100(cfg: DataConfig) -> DatasetSpec:
    """CIFAR-100 50 000/10 000, fine labels; REF: no validation split, zero-pad-4 crop + flip."""
    train, test = load_torchvision(tvd.CIFAR100, cfg, "CIFAR-100")
    return DatasetSpec(*train, *test, info=DATASETS["cifar100"], mean=(0.50708, 0.48655, 0.44092),
                       std=(0.26733, 0.25644, 0.27615), augment=CropFlip(4, "zeros"), valid_split=0.0)


# ---------------------------------------------------------------------------------------------
# Datasets without files


@register_dataset("digits")
def digits(cfg: DataConfig) -> DatasetSpec:
    """scikit-learn's bundled 8x8 digits: 1797 images, values 0..16, no download.

    Fixed stratified 80/20 split with seed 0 (independent of the run seed): 1437 train / 360
    test. Values scaled to [0, 1]; normalised by the train part's mean/std; no augmentation.
    """
    from sklearn.datasets import load_digits  # sklearn is slow to import; only here
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_i, test_i = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, stratify=bunch.target, random_state=0
    )
    train_i, test_i = torch.as_tensor(train_i), torch.as_tensor(test_i)
    train_x = x[train_i]
    return DatasetSpec(train_x, y[train_i], x[test_i], y[test_i], info=DATASETS["digits"],
                       mean=(train_x.mean().item(),), std=(train_x.std().item(),))


@register_dataset("synthetic")
def synthetic(cfg: DataConfig) -> DatasetSpec:
    """Standard-normal float32 inputs of ``--synthetic-shape`` with uniform random labels.

    ``--synthetic-size`` train and 256 test samples, fixed by seed 0 (not the run seed), so
    benchmarks of different runs see the same data. Already normalised: mean 0, std 1.
    """
    gen = torch.Generator().manual_seed(0)
    shape, classes = cfg.synthetic_shape, cfg.synthetic_classes
    n = cfg.synthetic_size + SYNTHETIC_TEST_SIZE
    x = torch.randn((n, *shape), generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    cut = cfg.synthetic_size
    channels = shape[0]
    return DatasetSpec(x[:cut], y[:cut], x[cut:], y[cut:], info=DatasetInfo(classes, shape),
                       mean=(0.0,) * channels, std=(1.0,) * channels)
