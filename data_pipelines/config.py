"""Settings of the data pipeline: one dataclass, validated on construction.

Field names follow the papers' flags (``--data``, ``--data-dir``, ``--batch-size``,
``--test-batch-size``, ``--valid-split``); errors name the flag so that the command-line user
knows what to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import check_dataset

LOADERS = ("auto", "dali", "torchvision")
DECODE_DEVICES = ("auto", "cpu", "gpu")


@dataclass
class DataConfig:
    """Which dataset, where it lies on disk, and how it is batched.

    name: registered dataset (``--data``): digits, mnist, cifar10, cifar100, synthetic or
        imagenet.
    data_dir: root folder in torchvision's own on-disk format (``--data-dir``); for imagenet
        the folder holding ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``.
    download: let torchvision fetch missing files (``--download``; needs internet).
    batch_size / test_batch_size: samples per batch PER PROCESS (``--batch-size``,
        ``--test-batch-size``).
    num_workers: worker processes of file-based pipelines (``--num-workers``): DataLoader
        workers of the torchvision ImageNet loader, decoding threads (``num_threads``) of the
        DALI one (0: DALI uses min(4, CPU count) threads); the in-memory datasets batch in the
        main process and ignore it.
    valid_split: fraction of the training set held out (its last part) for validation
        (``--valid-split``); None = the dataset's reference default (cifar10 0.1, mnist 0.1,
        others 0.0). 0 = no validation loader.
    augment: standard augmentation of the training split (crop + flip on CIFAR).
    synthetic_shape / synthetic_classes / synthetic_size: the ``synthetic`` benchmark set
        (per-sample input shape, class count, training samples).

    ImageNet only (the in-memory datasets ignore them):
    loader: ``auto`` (DALI if it imports, else torchvision), ``dali`` or ``torchvision``
        (``--loader``).
    image_size: training crop and validation centre crop in pixels (``--image-size``; the
        recipe's 224); validation first resizes the shorter side to round(image_size * 256/224).
    fp16_output: batches in float16 instead of float32 (halves host-to-device traffic).
    channels_last: batches in channels_last memory format (same (B, 3, S, S) shape).
    decode_device: ``auto`` (DALI ``mixed`` GPU decoding when CUDA is available, unless
        ACCELERATE_USE_CPU is set), ``cpu`` or ``gpu``.
    check_data: also read the headers of every training file before training
        (``--check-data``; the evaluation split's are always read: ``check_loaders``).
    """

    name: str = "digits"
    data_dir: str = "data"
    download: bool = False
    batch_size: int = 128
    test_batch_size: int = 100
    num_workers: int = 0
    valid_split: float | None = None
    augment: bool = True
    synthetic_shape: tuple[int, ...] = (3, 32, 32)
    synthetic_classes: int = 10
    synthetic_size: int = 1024
    loader: str = "auto"
    image_size: int = 224
    fp16_output: bool = False
    channels_last: bool = False
    decode_device: str = "auto"
    check_data: bool = False

    def __post_init__(self) -> None:
        # YAML/TOML and argparse hand over lists and paths; store the declared types.
        self.data_dir = str(self.data_dir)
        self.synthetic_shape = tuple(self.synthetic_shape)
        check_dataset(self.name)  # raises, listing the known datasets
        _check(self.batch_size >= 1, "--batch-size", f"{self.batch_size} must be >= 1")
        _check(self.test_batch_size >= 1, "--test-batch-size", f"{self.test_batch_size} must be >= 1")
        _check(self.num_workers >= 0, "--num-workers", f"{self.num_workers} must be >= 0")
        _check(self.valid_split is None or 0 <= self.valid_split < 1, "--valid-split",
               f"{self.valid_split} must be in [0, 1)")
        _check(len(self.synthetic_shape) >= 1 and all(int(s) == s and s >= 1 for s in self.synthetic_shape),
               "--synthetic-shape", f"{self.synthetic_shape} must be positive integers, e.g. 3 32 32")
        _check(self.synthetic_classes >= 1, "--synthetic-classes", f"{self.synthetic_classes} must be >= 1")
        _check(self.synthetic_size >= 1, "--synthetic-size", f"{self.synthetic_size} must be >= 1")
        _check(self.loader in LOADERS, "--loader", f"{self.loader!r}: choose {', '.join(LOADERS)}")
        _check(self.image_size >= 8, "--image-size", f"{self.image_size} must be >= 8")
        _check(self.decode_device in DECODE_DEVICES, "--decode-device",
               f"{self.decode_device!r}: choose {', '.join(DECODE_DEVICES)}")


def _check(ok: bool, flag: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{flag}: {why}")
