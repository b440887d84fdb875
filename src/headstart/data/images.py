"""Reading one image file into an RGB picture, or a clear ``ImageReadError`` that callers skip and report.

``load_image`` gives a Pillow picture; ``load_pixels`` gives the same pixels as a uint8 tensor and decodes
ordinary JPEGs with simplejpeg (libjpeg-turbo, the GIL released throughout), which the input pipeline's
threads need on a small machine.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps

from ..errors import ImageReadError

__all__ = ["IMAGE_EXTENSIONS", "load_image", "load_pixels", "is_image_name", "is_junk_name"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})
_FORMATS = {"JPEG", "PNG", "GIF", "BMP", "WEBP", "MPO"}  # MPO: phones' multi-picture JPEGs


_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})


def is_junk_name(name: str) -> bool:
    """Hidden files and folders and OS debris (``.DS_Store``, ``__MACOSX``, ``.ipynb_checkpoints``...)."""
    return name.startswith(".") or name in _JUNK_NAMES


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | Path, min_size: int | None = None) -> Image.Image:
    """Decode ``path`` as an upright RGB image.

    EXIF orientation is applied; alpha is composited on white; palette, grayscale, 16-bit and CMYK
    images are converted; an animated GIF gives its first frame. With ``min_size``, a JPEG is
    decoded at the smallest power-of-two reduction whose sides stay at least ``min_size``.

    Raises:
        ImageReadError: the file is missing, empty, not an image, truncated, or over Pillow's
            decompression-bomb limit. Nothing else escapes.
    """
    with _reading(path) as im:
        if min_size and im.format in ("JPEG", "MPO"):
            im.draft("RGB", (min_size, min_size))
        im.load()
        return _to_rgb(ImageOps.exif_transpose(im))


def load_pixels(path: str | Path, min_size: int | None = None) -> torch.Tensor:
    """``load_image`` as a uint8 tensor ``(3, H, W)``: the same pixels, the same errors.

    Colour JPEGs are decoded by simplejpeg with Pillow's draft reduction and libjpeg-turbo settings (the
    same pixels); everything else, and any JPEG libjpeg warns about, goes through ``load_image``.
    """
    with _reading(path) as im:
        if im.format == "JPEG" and im.mode == "RGB":
            orientation = im.getexif().get(_ORIENTATION, 1)
            W, H = im.size
            f = 1
            if min_size:  # Pillow's draft: the largest of 8, 4, 2 that keeps both sides >= min_size
                f = next((s for s in (8, 4, 2) if min(W // min_size, H // min_size) >= s), 1)
            try:
                a = simplejpeg.decode_jpeg(Path(path).read_bytes(), "RGB", min_height=-(-H // f), min_width=-(-W // f))
                return torch.from_numpy(_upright(a, orientation)).permute(2, 0, 1)
            except ValueError:  # strict about libjpeg's warnings; Pillow decides whether those files are readable
                pass
    return torch.from_numpy(np.array(load_image(path, min_size), dtype=np.uint8)).permute(2, 0, 1)


_ORIENTATION = 0x0112


def _upright(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to ``(H, W, 3)`` pixels as ``ImageOps.exif_transpose`` does to a picture
    (in numpy: a torch flip would start an OpenMP team in each decode thread)."""
    if orientation in (5, 6, 7, 8):
        a = a.transpose(1, 0, 2)
    if orientation in (3, 4, 7, 8):
        a = a[::-1]
    if orientation in (2, 3, 6, 7):
        a = a[:, ::-1]
    return np.ascontiguousarray(a) if orientation in range(2, 9) else a


@contextmanager
def _reading(path: str | Path) -> Iterator[Image.Image]:
    """The opened picture (headers read, pixels not yet); any failure inside the block is an ``ImageReadError``."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(path, "is an empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's per-file warnings become our skip reports
            with Image.open(path) as im:
                if im.format not in _FORMATS:
                    raise ImageReadError(path, f"is a {im.format} file; expected JPEG, PNG, GIF, BMP or WebP")
                yield im
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"is too large to decode safely ({exc})") from exc
    except FileNotFoundError as exc:
        raise ImageReadError(path, "does not exist") from exc
    except Exception as exc:  # Pillow raises many types on damaged files; each means "skip this one"
        kind = "truncated or damaged" if "truncat" in str(exc).lower() else "not a readable image"
        raise ImageReadError(path, f"is {kind} ({type(exc).__name__}: {str(exc)[:120]})") from exc


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float grayscale: scale by the actual range, not a clip at 255
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        canvas = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, im).convert("RGB")
    return im.convert("RGB")
