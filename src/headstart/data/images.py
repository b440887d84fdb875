"""Reading one image file into an RGB picture, or a clear ``ImageReadError`` that callers skip and report."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageReadError

__all__ = ["IMAGE_EXTENSIONS", "load_image", "is_image_name", "is_junk_name"]

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
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(path, "is an empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's per-file warnings become our skip reports
            with Image.open(path) as im:
                if im.format not in _FORMATS:
                    raise ImageReadError(path, f"is a {im.format} file; expected JPEG, PNG, GIF, BMP or WebP")
                if min_size and im.format in ("JPEG", "MPO"):
                    im.draft("RGB", (min_size, min_size))
                im.load()
                upright = ImageOps.exif_transpose(im)
                return _to_rgb(upright)
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
