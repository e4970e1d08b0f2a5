"""Files the loaders cannot use: the header pre-flight (``check_file``, ``check_files``), the
one-line error naming such a file (``bad_file_error``), and the full-decode search for it after
a pipeline failed on a batch (``find_undecodable``)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .folder import ImageFolder

__all__ = ["DALI_FORMATS", "JPEG_MAGIC", "PNG_MAGIC", "bad_file_error", "check_file", "check_files",
           "find_undecodable", "pil_reason", "unreadable_reason"]


def find_undecodable(paths: list[Path]) -> tuple[Path, str] | None:
    """The first of ``paths`` that cannot be read or fully decoded, with why; None if all can.

    Used after a pipeline failed on a batch (DALI's errors do not name the file): each file
    is opened and decoded completely by PIL (truncated files fail too). Files that PIL
    decodes but DALI does not are found by ``dali_backend.find_dali_undecodable``.
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
            return path, f"not a decodable image ({pil_reason(err, path)})"
    return None


def unreadable_reason(path: Path, err: OSError) -> str:
    """Why ``path`` could not be opened, in a few words (a dangling symlink says so)."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"a broken symbolic link (to {os.readlink(path)})"
    return f"unreadable: {err.strerror or err}"


def pil_reason(err: Exception, path: Path) -> str:
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
        return f"not a decodable image ({pil_reason(err, path)})"
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

