"""An upload's bytes -> the normalised image tensor the model expects, or an ``ImageReadError`` with the reason.

    >>> x = decode_upload(data, "cat.jpg", model.data_config)     # (3, H, W) float32

The same steps as ``headstart predict`` on a file (same decoder, same JPEG draft size, same transform), so the
service and the command give the same answer for the same image.
"""

from __future__ import annotations

import io
import re
import warnings

import torch
from PIL import Image, ImageOps

from ..config import DataConfig
from ..data.images import _FORMATS, _to_rgb
from ..data.transforms import EvalTransform, decode_size, pixels as _as_pixels
from ..errors import ImageReadError

__all__ = ["decode_upload"]

_STREAM = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")  # Pillow names the stream; the client knows its file


def decode_upload(data: bytes, name: str, cfg: DataConfig, max_pixels: int | None = None) -> torch.Tensor:
    """Decode ``data`` (an uploaded image file's bytes) and prepare it for a model with data config ``cfg``.

    ``name`` only labels errors. With ``max_pixels``, an image larger than that is refused before its pixels
    are decoded (a decompression bomb: a small file that would decode to gigabytes).

    Returns:
        The normalised float tensor ``(3, H, W)`` of ``EvalTransform(cfg)``.

    Raises:
        ImageReadError: empty, not an image, truncated or damaged, or too large; ``reason`` says which.
    """
    if not data:
        raise ImageReadError(name, "is empty (0 bytes)")
    if max_pixels is not None:
        _check_pixels(data, name, max_pixels)
    return EvalTransform(cfg)(_load_pixels(data, name, decode_size(cfg)))


def _load_pixels(data: bytes, name: str, min_size: int):
    # TEMPORARY until data.images.load_pixels reads bytes (issue 13): the same steps as load_image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                if im.format not in _FORMATS:
                    raise ImageReadError(name, f"is a {im.format} file; expected JPEG, PNG, GIF, BMP or WebP")
                if im.format in ("JPEG", "MPO"):
                    im.draft("RGB", (min_size, min_size))
                im.load()
                return _as_pixels(_to_rgb(ImageOps.exif_transpose(im)))
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, f"is too large to decode safely ({exc})") from exc
    except Exception as exc:  # Pillow raises many types on damaged files
        kind = "truncated or damaged" if "truncat" in str(exc).lower() else "not a readable image"
        raise ImageReadError(name, f"is {kind} ({type(exc).__name__}: {_STREAM.sub('the upload', str(exc))[:120]})") from exc


def _check_pixels(data: bytes, name: str, max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels (only the header is read)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's bomb warning: the check below is the stricter one
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, f"is too large to decode safely ({exc})") from exc
    except Exception:  # not an image: the loader gives the precise reason
        return
    if w * h > max_pixels:
        raise ImageReadError(name, f"is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels); this service decodes at most "
                                   f"{max_pixels / 1e6:.0f} megapixels (--max-megapixels): a decompression bomb, "
                                   "or a photo to scale down first")
