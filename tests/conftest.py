"""Shared test fixtures: tiny data sets in torchvision's real on-disk formats.

CIFAR's torchvision classes verify every file against an md5 table (class attributes
``train_list``/``test_list``/``meta``); the fixtures put the md5s of the fake files into that
table (``monkeypatch``) and leave the loading code itself untouched. MNIST's raw idx files carry
no md5 check. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torchvision import datasets as tvd


@dataclass
class FakeSet:
    """A fake dataset on disk and the raw tensors written: x uint8 (N, C, H, W), y int64 (N,)."""

    root: Path
    folder: Path
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: where torch sees no GPU they are skipped, saying why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs CUDA, and torch.cuda.is_available() is false")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def random_set(
    gen: torch.Generator, n: int, shape: tuple[int, ...], classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """n random uint8 images (n, *shape) and int64 labels (n,) in [0, classes)."""
    x = torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
    return x, torch.randint(0, classes, (n,), generator=gen)


def _write_cifar(root: Path, cls: type[tvd.CIFAR10], label_key: str, classes: int, sizes: list[int],
                 monkeypatch: pytest.MonkeyPatch) -> FakeSet:
    """torchvision's CIFAR layout: one pickled dict per file, data uint8 (n, 3072) in CHW order.

    The real files are Python 2 pickles read with ``encoding="latin1"``, which gives str keys;
    so the fake ones are pickled with str keys. ``sizes``: samples per train file, then test.
    """
    gen = torch.Generator().manual_seed(classes)
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    parts = []
    for (name, _), n in zip(cls.train_list + cls.test_list, sizes):
        x, y = random_set(gen, n, (3, 32, 32), classes)
        entry = {"data": x.reshape(n, 3072).numpy(), label_key: y.tolist()}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        parts.append((x, y))
    meta_key = cls.meta["key"]
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(classes)]}))
    # The md5 table is data about the files, not loading code: point it at the fake files.
    monkeypatch.setattr(cls, "train_list", [[n, _md5(folder / n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, _md5(folder / n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})
    train = parts[: len(cls.train_list)]
    return FakeSet(root, folder, torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), *parts[-1])


def _write_idx(path: Path, x: torch.Tensor) -> None:
    """The MNIST idx format: magic (0, 0, type 8 = uint8, ndim), big-endian dims, raw bytes."""
    header = struct.pack(">I", 0x0800 + x.ndim) + struct.pack(f">{x.ndim}I", *x.shape)
    path.write_bytes(header + x.numpy().tobytes())


@pytest.fixture
def fake_cifar10_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSet:
    """Big enough for the papers' batch 128 after the 10% validation split (180 train)."""
    return _write_cifar(tmp_path, tvd.CIFAR10, "labels", 10, [40] * 5 + [30], monkeypatch)


@pytest.fixture
def fake_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSet:
    return _write_cifar(tmp_path, tvd.CIFAR10, "labels", 10, [20] * 5 + [30], monkeypatch)


@pytest.fixture
def fake_cifar100_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSet:
    """Big enough for the papers' batch 128 (160 train images, no validation split)."""
    return _write_cifar(tmp_path, tvd.CIFAR100, "fine_labels", 100, [160, 20], monkeypatch)


@pytest.fixture
def fake_cifar100(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSet:
    return _write_cifar(tmp_path, tvd.CIFAR100, "fine_labels", 100, [60, 20], monkeypatch)


@pytest.fixture
def fake_mnist(tmp_path: Path) -> FakeSet:
    gen = torch.Generator().manual_seed(1)
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    sets = []
    for prefix, n in (("train", 50), ("t10k", 20)):
        x, y = random_set(gen, n, (1, 28, 28), 10)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", x[:, 0])
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", y.to(torch.uint8))
        sets += [x, y]
    return FakeSet(tmp_path, folder, *sets)
