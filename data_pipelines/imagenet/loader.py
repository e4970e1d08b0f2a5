"""``ImageNetLoader``: a ``ShardedLoader`` over an ``ImageFolder``, what the torchvision and the
DALI pipelines share (the recipe's constants, the pre-flight of its split)."""

from __future__ import annotations

from ..sharding import ShardedLoader
from .checks import check_files
from .folder import ImageFolder

__all__ = ["CROP_ATTEMPTS", "IMAGENET_MEAN", "IMAGENET_STD", "ImageNetLoader", "RATIO", "SCALE", "val_resize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RandomResizedCrop of the reference recipe: area fraction, aspect ratio, attempts.
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10


def val_resize(image_size: int) -> int:
    """Shorter side before the evaluation centre crop: 256 for 224, in the same ratio otherwise."""
    return int(round(image_size * 256 / 224))


class ImageNetLoader(ShardedLoader):
    """Batches of ONE rank over one split (``folder``), sharded and resumable as every
    ``ShardedLoader``; the subclasses (torchvision, DALI) only differ in how they turn files
    into batches (``_batches``). Indices are into ``folder.files``.

    Every batch is ``(x, y)``: x (B, 3, S, S) normalised float32 (float16 with
    ``fp16_output``; channels_last memory format with ``channels_last``), y int64 (B,), both on
    this process's GPU with ``gpu``, else CPU tensors. ``num_workers``: DataLoader workers
    (torchvision) or DALI's decoding threads (0: min(4, CPUs)).
    """

    backend = "base"
    # The training order's stream tag since ImageNet runs began (mid-epoch checkpoints of
    # those runs resume into the same permutation).
    shuffle_stream = 10

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
        """Raises ``ValueError`` unless 0 <= rank < world_size and batch_size >= 1."""
        super().__init__(len(folder), batch_size, train=train, seed=seed, rank=rank, world_size=world_size)
        self.folder = folder
        self.augment = augment and train
        self.image_size = image_size
        self.fp16_output = fp16_output
        self.channels_last = channels_last
        self.num_workers = num_workers
        self.gpu = gpu

    def check_files(self, *, shard: bool = False) -> int:
        """Pre-flight of this loader's split (``check_files``: headers, no decoding, as this
        backend reads them); ``shard``: only this rank's 1/W of the files (rank, rank + W, ...).
        Returns the files checked; raises ``DataError`` naming the first bad one."""
        w = self.world_size if shard else 1
        return check_files(self.folder, dali=self.backend == "dali", rank=self.rank % w, world_size=w)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.folder.root}, {len(self)} batches of {self.batch_size}, "
                f"rank {self.rank}/{self.world_size}, {'train' if self.train else 'eval'})")
