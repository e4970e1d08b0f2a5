"""The NVIDIA DALI ImageNet pipeline (``--loader dali``); imported only by ``build`` when it is used.

One DALI pipeline per iteration of a loader (an epoch, or one pass over the validation set):

* reader: ``fn.readers.file`` over an explicit file list. For training the list is this
  GLOBAL rank's own part of the epoch, in order (``ShardedLoader.indices``: positions
  s + r, s + r + W, ... of the epoch's permutation, the sharding rule of every loader,
  from the resume point s on, whole global batches only), read as shard 0 of 1: every rank
  runs the same number of batches, and each pipeline lists only its 1/W of the files. For
  evaluation it is likewise this GLOBAL rank's own shard (samples r, r + W, ...; the local
  rank would evaluate every machine of a multi-node run on the same fraction of the data),
  read as shard 0 of 1 with ``pad_last_batch=True``: DALI pads the last batch by repeating
  the last sample and the iterator (``LastBatchPolicy.PARTIAL`` with ``reader_name``) drops
  the padding, so each sample is counted once, for any split size on any number of
  processes (a rank with an empty shard, N < W, builds no pipeline; DALI's own sharding
  would refuse more shards than files).
* training: ``decoders.image_random_crop`` (decodes only the crop: 761 against 620 images/s
  for decode-then-crop on a 2-core CPU) -> ``resize`` to S x S -> ``crop_mirror_normalize``
  with a random flip; evaluation: ``decoders.image`` -> ``resize`` (shorter side) ->
  centre crop in ``crop_mirror_normalize``.
* decoding ``mixed`` (nvJPEG on the GPU) when the loader is on a GPU, else a CPU pipeline
  (``device_id=None``); ``num_threads`` = ``--num-workers`` (0: min(4, CPUs)); DALI runs
  ``prefetch_queue_depth`` = 2 batches ahead of the training loop.
* seed of the pipeline (crops, flips): derived from (seed, epoch, rank, start batch), with
  start batch = start_sample // (B W), so ranks draw different crops and a resumed epoch
  starts from a fresh, reproducible seed.

DALI's decoder errors do not name the file; on a failure the files of the batches in flight
are checked one by one, decoded by PIL (``find_undecodable``: unreadable, empty, truncated,
not an image), then by DALI itself (``find_dali_undecodable``: formats PIL reads but DALI does
not, e.g. a GIF or a PNG without its IEND chunk under a .JPEG name), and the ``DataError``
names the bad one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ..errors import DataError
from ..sharding import derive_seed
from .checks import bad_file_error, find_undecodable, unreadable_reason
from .loader import CROP_ATTEMPTS, IMAGENET_MEAN, IMAGENET_STD, RATIO, SCALE, ImageNetLoader, val_resize

__all__ = ["DaliLoader", "decode_with_dali", "find_dali_undecodable", "imagenet_pipeline"]

# derive_seed stream tag of the pipeline seed (crops, flips).
_DALI = 12

READER = "Reader"
PREFETCH = 2  # batches DALI prepares ahead (pipeline prefetch_queue_depth)
# nvJPEG buffers sized for ImageNet's largest images (NVIDIA's ResNet-50 example), so the
# mixed decoder does not reallocate during the first epoch.
GPU_DECODER_MEMORY = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512)
# How every pipeline here decodes: 8-bit RGB; EXIF orientation ignored, as torchvision's and
# PIL's readers do (the torchvision loader matches these pixels: decode.to_rgb8).
DECODE = dict(output_type=types.RGB, adjust_orientation=False)


def dali_threads(num_workers: int) -> int:
    return num_workers if num_workers > 0 else max(1, min(4, os.cpu_count() or 1))


def imagenet_pipeline(
    *,
    file_root: str,
    files: list[str],
    labels: list[int],
    pad_last_batch: bool,
    augment: bool,
    image_size: int,
    gpu: bool,
    fp16_output: bool,
    channels_last: bool,
    batch_size: int,
    num_threads: int,
    seed: int,
):
    """An unbuilt DALI pipeline yielding ("x", "y") for the given files (see module doc).

    x: (B, 3, S, S) normalised (``channels_last``: (B, S, S, 3), HWC), float32 or float16;
    y: (B, 1) int32. On the GPU (device ``torch.cuda.current_device()``) when ``gpu``.
    """
    decode = "mixed" if gpu else "cpu"
    memory = GPU_DECODER_MEMORY if gpu else {}
    s = image_size

    @pipeline_def(batch_size=batch_size, num_threads=num_threads,
                  device_id=torch.cuda.current_device() if gpu else None, seed=seed,
                  prefetch_queue_depth=PREFETCH)
    def pipe():
        jpegs, y = fn.readers.file(
            file_root=file_root, files=files, labels=labels, random_shuffle=False,
            pad_last_batch=pad_last_batch, name=READER)
        if augment:
            # EXIF orientation is ignored, as torchvision's and PIL's readers do.
            img = fn.decoders.image_random_crop(
                jpegs, device=decode, **DECODE,
                random_area=list(SCALE), random_aspect_ratio=list(RATIO), num_attempts=CROP_ATTEMPTS, **memory)
            img = fn.resize(img, resize_x=s, resize_y=s, antialias=True)
            mirror = fn.random.coin_flip(probability=0.5)
            crop = None
        else:
            img = fn.decoders.image(jpegs, device=decode, **DECODE, **memory)
            img = fn.resize(img, resize_shorter=val_resize(s), antialias=True)
            mirror = 0
            crop = (s, s)
        img = fn.crop_mirror_normalize(
            img, dtype=types.FLOAT16 if fp16_output else types.FLOAT,
            output_layout="HWC" if channels_last else "CHW", crop=crop, mirror=mirror,
            mean=[m * 255 for m in IMAGENET_MEAN], std=[v * 255 for v in IMAGENET_STD])
        return img, (y.gpu() if gpu else y)

    return pipe()


class DaliLoader(ImageNetLoader):
    """``ImageNetLoader`` on a DALI pipeline built at the start of each iteration."""

    backend = "dali"

    def _batches(self, epoch: int, first: int, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b = self.batch_size
        count = -(-len(order) // b)  # batches of this iteration (training: all full)
        if count == 0:
            return
        # The reader lists exactly ``order`` (shard 0 of 1). Training: whole batches, the same
        # count on every rank, so DROP discards nothing. Evaluation: DALI pads the last batch
        # and PARTIAL drops the padding.
        files = order.tolist()
        folder = self.folder
        pipe = imagenet_pipeline(
            file_root=str(folder.root), files=[folder.files[i] for i in files],
            labels=folder.labels[files].tolist(), pad_last_batch=not self.train, augment=self.augment,
            image_size=self.image_size, gpu=self.gpu, fp16_output=self.fp16_output,
            channels_last=self.channels_last, batch_size=self.batch_size,
            num_threads=dali_threads(self.num_workers),
            seed=derive_seed(self.seed, _DALI, epoch, self.rank, first) % 2**31)
        j = 0  # batches of this iteration handed out
        try:
            pipe.build()
            batches = DALIGenericIterator(
                [pipe], ["x", "y"], reader_name=READER, auto_reset=False,
                last_batch_policy=LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL)
            while j < count:
                out = next(batches, None)  # DALI's copies into fresh torch tensors
                if out is None:  # not expected: DALI yields at least ``count`` batches
                    break
                j += 1
                if j == count:
                    # The last batch: free the pipeline (threads, buffers) before handing it
                    # out; the trainer evaluates after it and never asks for the next one.
                    del batches, pipe
                x, y = out[0]["x"], out[0]["y"].view(-1).long()
                if y.numel() == 0:  # an all-padding last batch of a shorter evaluation shard
                    continue
                if self.channels_last:
                    x = x.permute(0, 3, 1, 2)  # (B, S, S, 3) -> (B, 3, S, S), channels_last strides
                yield x, y
        except RuntimeError as err:
            raise self._decode_error(err, epoch, first + j, order[j * b:(j + PREFETCH + 2) * b]) from None
        # An iteration abandoned earlier frees the pipeline when its generator is closed or
        # collected (the trainer rebinds it at the next epoch).

    def _decode_error(self, err: RuntimeError, epoch: int, k: int, in_flight: torch.Tensor) -> DataError:
        """A one-line ``DataError`` naming the file DALI failed on, found among the samples
        ``in_flight`` (the batches k .. k + prefetch): PIL decodes each, then DALI does
        (this loader's device); DALI's own message, naming the folder, if none fails alone."""
        paths = [self.folder.path(i) for i in in_flight.tolist()]
        bad = find_undecodable(paths)
        if bad is None:
            try:
                bad = find_dali_undecodable(paths, gpu=self.gpu)
            except Exception:  # noqa: BLE001 - the check itself failed: report DALI's error
                bad = None
        if bad is not None:
            return bad_file_error(*bad)
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        after = [ln for i, ln in enumerate(lines) if i and lines[i - 1] == "encountered:"]
        why = (after or lines or [type(err).__name__])[0]
        return DataError(f"--data-dir: DALI failed reading {self.folder.root} near batch {k} of epoch "
                         f"{epoch} ({why}); the files of those batches decode with PIL and DALI one "
                         f"by one, check them")


# ---------------------------------------------------------------------------------------------
# Single files through DALI's decoder (naming a file DALI fails on; comparing decoders)


def _single_decoder(gpu: bool):
    """A built pipeline decoding one file at a time fed to input "data", as the loaders do."""
    decode = "mixed" if gpu else "cpu"

    @pipeline_def(batch_size=1, num_threads=1, device_id=torch.cuda.current_device() if gpu else None,
                  prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    def pipe():
        data = fn.external_source(name="data", dtype=types.UINT8)
        return fn.decoders.image(data, device=decode, **DECODE)

    p = pipe()
    p.build()
    return p


def _decode_each(paths: list[Path], gpu: bool) -> Iterator[tuple[Path, np.ndarray | str]]:
    """(path, uint8 (H, W, 3) array) for each path, or (path, why) for the first one DALI
    cannot read or decode, and then nothing more (a failed DALI pipeline is not reusable)."""
    if not paths:
        return
    pipe = _single_decoder(gpu)
    try:
        for path in paths:
            try:
                data = np.fromfile(path, dtype=np.uint8)
            except OSError as err:
                yield path, unreadable_reason(path, err)
                return
            if data.size == 0:
                yield path, "empty file"
                return
            pipe.feed_input("data", [data])
            try:
                (out,) = pipe.run()
            except RuntimeError:
                yield path, _dali_refusal(path)
                return
            if gpu:
                out = out.as_cpu()
            yield path, np.array(out[0])
    finally:
        del pipe


def _dali_refusal(path: Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as img:
            what = f"a {img.format} {img.mode} image"
    except Exception:  # noqa: BLE001
        what = "a file"
    return (f"{what} that NVIDIA DALI cannot decode (PIL can: convert it to JPEG, or use "
            f"--loader torchvision)")


def find_dali_undecodable(paths: list[Path], gpu: bool = False) -> tuple[Path, str] | None:
    """The first of ``paths`` DALI's decoder fails on, decoded one by one (``gpu``: the
    "mixed" decoder of the GPU loaders), with why; None if DALI decodes them all."""
    for path, out in _decode_each(paths, gpu):
        if isinstance(out, str):
            return path, out
    return None


def decode_with_dali(paths: list[Path], gpu: bool = False) -> list[torch.Tensor]:
    """uint8 (3, H, W) RGB of each file, decoded as the DALI loaders decode (no crop, no
    resize): the counterpart of ``decode.decode_file``. ``DataError`` naming a file it fails on."""
    out = []
    for path, img in _decode_each(list(paths), gpu):
        if isinstance(img, str):
            raise bad_file_error(path, img)
        out.append(torch.from_numpy(img).permute(2, 0, 1))
    return out
