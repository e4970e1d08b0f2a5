"""``decode_file``: any image a folder can hold to the 8-bit RGB pixels NVIDIA DALI's decoder
gives (``to_rgb8``: DALI's rules for 16-bit, float, CMYK, YCbCr, palette and alpha images), so
that the torchvision pipeline and the DALI one see the same pixels."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from .checks import JPEG_MAGIC, PNG_MAGIC, bad_file_error, pil_reason, unreadable_reason

__all__ = ["decode_file", "to_rgb8"]


def decode_file(path: Path) -> torch.Tensor:
    """uint8 (3, H, W) RGB, the pixels NVIDIA DALI's decoder (``output_type=RGB``) gives.

    JPEG: ``torchvision.io.decode_jpeg`` (libjpeg-turbo, DALI's CPU decoder too: equal
    pixels; grayscale replicated); CMYK/YCCK JPEGs go to PIL and ``to_rgb8``'s CMYK rule
    (decode_jpeg's own CMYK conversion rounds differently). PNG: ``decode_png`` (libpng),
    16-bit samples scaled as DALI does (``to_rgb8``). Anything else (or what those refuse): PIL
    and ``to_rgb8``. Raises ``DataError`` naming the file if none can decode it.
    """
    from torchvision.io import ImageReadMode, decode_jpeg, decode_png

    try:
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    except OSError as err:
        raise bad_file_error(path, unreadable_reason(path, err)) from None
    if data.numel() == 0:
        raise bad_file_error(path, "empty file")
    head = data[:8].numpy().tobytes()
    try:
        # torchvision 0.29 deprecates its codecs for TorchCodec and warns on every call;
        # decode_jpeg is still the fastest CPU JPEG decoder it ships.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            if head.startswith(JPEG_MAGIC):
                img = decode_jpeg(data, mode=ImageReadMode.UNCHANGED)
                if img.shape[0] == 3:
                    return img
                if img.shape[0] == 1:
                    return img.expand(3, -1, -1).contiguous()
            elif head.startswith(PNG_MAGIC):
                img = decode_png(data, mode=ImageReadMode.RGB)
                return img if img.dtype == torch.uint8 else _to8(img.to(torch.int32))
    except Exception:  # noqa: BLE001 - not decodable by torchvision: PIL decides below
        pass
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = np.require(to_rgb8(img), requirements="W")  # PIL's arrays are read-only
    except Exception as err:  # noqa: BLE001
        raise bad_file_error(path, f"not a decodable image ({pil_reason(err, path)})") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _to8(x):
    """16-bit samples (any integer array or tensor) to 8 bits as DALI does: round(v * 255 / 65535)
    (v / 257 rounded; never a tie), after clipping to 0..65535."""
    lib = torch if isinstance(x, torch.Tensor) else np
    v = lib.clip(x.astype(np.int64) if lib is np else x, 0, 65535)
    out = (v * 255 + 32767) // 65535
    return out.to(torch.uint8) if lib is torch else out.astype(np.uint8)


def to_rgb8(img) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a PIL image of any mode, converted as NVIDIA DALI converts the
    same file (``fn.decoders.image``, ``output_type=RGB``; checked pixel for pixel on DALI 2.4's
    CPU decoder, tests/test_imagenet.py):

    * alpha is dropped, never composited (RGBA, LA, PA); gray is replicated to 3 channels;
      palettes (P) are looked up; 1-bit images give 0 and 255: PIL's ``convert("RGB")``;
    * 16-bit samples (I;16*, and I, which PIL gives 16-bit PGM/TIFF/PNG data): v -> round(v *
      255 / 65535) = (v * 255 + 32767) // 65535, after clipping to 0..65535 (PIL's own
      conversion clips: 40 000 would be white instead of 156); a TIFF's 16-bit palette is
      scaled the same way;
    * F (32-bit float, 0..1 = black..white): floor(clip(v * 255, 0, 255) + 0.5) in float32;
    * CMYK (ink amounts, Adobe's inversion undone by PIL): R = (255 - K) * (255 - C) // 255,
      truncated, likewise G from M and B from Y (PIL rounds);
    * YCbCr (TIFF): libtiff's ``TIFFYCbCrtoRGB`` with the file's YCbCrCoefficients and
      ReferenceBlackWhite (DALI decodes these through OpenCV's libtiff; PIL's formula differs
      by 1). JPEG's YCbCr never reaches PIL here (``decode_file`` uses libjpeg-turbo).

    DALI itself departs from any sensible reading for 2-channel TIFFs (LA, PA: it returns the
    samples regrouped as 3 channels), and cannot decode GIF, PFM, 32-bit integer TIFFs, TIFFs
    without BitsPerSample or JPEG 2000 with alpha/CMYK; those are PIL's ``convert("RGB")``
    (the first ones) here, and a ``DataError`` naming the file from the DALI loader.
    """
    m = img.mode
    if m == "I" or m.startswith("I;16"):
        return np.repeat(_to8(np.asarray(img))[..., None], 3, axis=2)
    if m == "F":
        v = np.nan_to_num(np.asarray(img, dtype=np.float32)) * np.float32(255)
        gray = np.floor(np.clip(v, 0, 255) + np.float32(0.5)).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if m == "CMYK":
        cmyk = np.asarray(img).astype(np.int32)
        return ((255 - cmyk[..., 3:]) * (255 - cmyk[..., :3]) // 255).astype(np.uint8)
    if m == "YCbCr":
        return _ycbcr_to_rgb(np.asarray(img), dict(getattr(img, "tag_v2", {}) or {}))
    if m == "P" and img.format == "TIFF" and 320 in getattr(img, "tag_v2", {}):
        colormap = np.asarray(img.tag_v2[320], dtype=np.int64).reshape(3, -1).T  # 16-bit entries
        return _to8(colormap)[np.asarray(img)]
    return np.asarray(img.convert("RGB"))


def _ycbcr_to_rgb(ycc: np.ndarray, tags: dict) -> np.ndarray:
    """libtiff's TIFFYCbCrToRGBInit + TIFFYCbCrtoRGB (tif_color.c): fixed point, 16 bits.

    Tags 529 (YCbCrCoefficients, default ITU-R BT.601) and 532 (ReferenceBlackWhite)."""
    f32 = np.float32
    red, green, blue = (f32(v) for v in tags.get(529, (0.299, 0.587, 0.114)))
    black_white = [f32(v) for v in tags.get(532, (0, 255, 128, 255, 128, 255))]
    shift, half = 16, 1 << 15

    def fix(x) -> int:
        return int(float(x) * (1 << shift) + 0.5)

    def code2v(c, black, white, rng):
        return (c - black) * f32(rng) / (white - black if white != black else f32(1))

    f1 = f32(2) - f32(2) * red
    f2 = red * f1 / green
    f3 = f32(2) - f32(2) * blue
    f4 = blue * f3 / green
    d1, d2, d3, d4 = fix(np.clip(f1, 0, 2)), -fix(np.clip(f2, 0, 2)), fix(np.clip(f3, 0, 2)), -fix(np.clip(f4, 0, 2))
    x = np.arange(-128, 128).astype(f32)
    cr = np.clip(code2v(x, black_white[4] - 128, black_white[5] - 128, 127), -4096, 4096).astype(np.int64)
    cb = np.clip(code2v(x, black_white[2] - 128, black_white[3] - 128, 127), -4096, 4096).astype(np.int64)
    y_tab = np.clip(code2v(x + 128, black_white[0], black_white[1], 255), -4096, 4096).astype(np.int64)
    y, cb_i, cr_i = y_tab[ycc[..., 0]], ycc[..., 1], ycc[..., 2]
    r = y + ((d1 * cr + half) >> shift)[cr_i]
    g = y + (((d4 * cb + half)[cb_i] + (d2 * cr)[cr_i]) >> shift)
    b = y + ((d3 * cb + half) >> shift)[cb_i]
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)

