"""The ImageNet folder layout: ``scan_split`` lists ``ROOT/<split>/<wnid>/*`` without opening a file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError

__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "scan_split"]

# What both pipelines decode; ImageNet itself holds only .JPEG files.
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


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

