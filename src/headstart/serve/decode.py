"""An upload's bytes -> the normalised image tensor the model expects, or an ``ImageReadError`` with the reason.

    >>> x = decode_upload(data, "cat.jpg", predictor, max_pixels=50_000_000)     # (3, H, W) float32

The pixels come from ``Predictor.prepare``, the same decoding and transform as ``headstart predict`` on a
file, so the service and the command give the same answer for the same image. A server adds one check
first: an image whose header declares more pixels than it will decode is refused before any decoding.
"""

from __future__ import annotations

import io
import re
import warnings

import torch
from PIL import Image

from ..errors import ImageReadError
from ..predict import Predictor

__all__ = ["decode_upload"]

_STREAM = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")  # Pillow names the stream; the client knows its file


def decode_upload(data: bytes, name: str, predictor: Predictor, max_pixels: int | None = None) -> torch.Tensor:
    """Decode ``data`` (an uploaded image file's bytes) and prepare it for ``predictor``'s model.

    ``name`` names the upload in errors. With ``max_pixels``, an image larger than that is refused from its
    header (a decompression bomb: a small file that would decode to gigabytes).

    Returns:
        The normalised float tensor ``(3, H, W)`` of ``predictor.prepare``.

    Raises:
        ImageReadError: empty, not an image, truncated or damaged, or too large; ``reason`` says which.
    """
    if max_pixels is not None:
        _check_pixels(data, name, max_pixels)
    try:
        return predictor.prepare(data, name=name)
    except ImageReadError as exc:
        if not _STREAM.search(exc.reason):
            raise
        raise ImageReadError(name, _STREAM.sub("", exc.reason)) from exc


def _check_pixels(data: bytes, name: str, max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels (only the header is read)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's bomb warning: the check below is the stricter one
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, f"is too large to decode safely ({exc})") from exc
    except Exception:  # not an image, or not one Pillow can open: prepare() gives the precise reason
        return
    if w * h > max_pixels:
        raise ImageReadError(name, f"is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels); this service decodes at most "
                                   f"{max_pixels / 1e6:.0f} megapixels (--max-megapixels): a decompression bomb, "
                                   "or a photo to scale down first")
