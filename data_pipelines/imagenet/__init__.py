"""ImageNet from the standard folder layout, read batch by batch: NVIDIA DALI or torchvision.

``--data imagenet --data-dir ROOT`` reads ``ROOT/train/<wnid>/*.JPEG`` and
``ROOT/val/<wnid>/*.JPEG`` (the validation images sorted into class folders, as the usual
``valprep.sh`` does). Class index = position of the wnid in the sorted list of ``train/``
folders, for both splits. ``--loader`` picks the pipeline:

* ``dali`` (``dali_backend``): NVIDIA DALI; fused decode + random-resized-crop
  (``decoders.image_random_crop`` decodes only the crop), on the GPU ("mixed") when CUDA is
  available, else a CPU pipeline (``device_id=None``); DALI prefetches batches in its own
  threads.
* ``torchvision`` (``torchvision_backend``): ``torchvision.io.decode_jpeg`` / ``decode_png`` +
  ``transforms.v2`` functionals on uint8 tensors in DataLoader workers (PIL for CMYK JPEGs and
  other formats renamed .JPEG). The fallback where DALI is not installed, and the comparison point.
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

Which samples a rank sees is the rule of every loader (``ShardedLoader``, ``sharding.py``):
training takes positions r, r + W, ... of a permutation seeded by (seed, epoch) and drops the
final partial global batch (``len = (N // W) // B``: 10 009 for ImageNet's 1 281 167 images on
2 ranks x 64); evaluation takes samples r, r + W, ... in order, the last batch may be smaller.

``set_epoch(e, start_batch=k)`` resumes mid-epoch: the next iteration yields exactly the
samples of batches k, k+1, ... of epoch e; the skipped batches are never read or decoded.
``set_epoch(e, start_sample=s)`` (training) resumes after s GLOBAL samples of the epoch, also
under another world size W' or batch size B' (an elastic resume). The torchvision pipeline
draws each sample's crop and flip from a generator seeded by (seed, epoch, sample), so a resumed epoch is identical to an uninterrupted one; DALI draws them from
its pipeline seed (seed, epoch, rank, s // (B W)), so after a resume the crops of that epoch
differ (the samples and their order do not).

The modules: ``folder`` (``scan_split``), ``checks`` (the pre-flight, errors naming a file),
``decode`` (``decode_file``), ``loader`` (``ImageNetLoader``, the recipe's constants),
``torchvision_backend``, ``dali_backend`` and ``build`` (``build_imagenet``, registered as
``--data imagenet``; the only importer of DALI, lazily).
"""

from __future__ import annotations

from .build import build_imagenet, dali_available, resolve_loader
from .checks import check_file, check_files
from .decode import decode_file, to_rgb8
from .folder import ImageFolder, scan_split
from .loader import IMAGENET_MEAN, IMAGENET_STD, ImageNetLoader, val_resize
from .torchvision_backend import TorchvisionLoader, random_resized_crop_box

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
    "random_resized_crop_box",
    "resolve_loader",
    "scan_split",
    "to_rgb8",
    "val_resize",
]
