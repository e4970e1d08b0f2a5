"""Choosing the ImageNet pipeline (``--loader``, ``--decode-device``) and building the loaders
of one rank; the only module that imports NVIDIA DALI, and only when it is used."""

from __future__ import annotations

import logging
import os

import torch

from ..build import Loaders
from ..config import DataConfig
from ..errors import DataError
from ..registry import register_loaders
from .folder import scan_split
from .torchvision_backend import TorchvisionLoader

__all__ = ["build_imagenet", "dali_available", "resolve_loader", "use_gpu"]

log = logging.getLogger("itop_dist.data")


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
        from .dali_backend import DaliLoader as cls
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
