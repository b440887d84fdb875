"""Images inside the report: small JPEG thumbnails and PNG plots as ``data:`` URIs, so the HTML file needs nothing
beside it and fetches nothing.

    >>> thumbnail_uri("val/ants/1.jpg")     # 'data:image/jpeg;base64,...' (112 px on its longer side), or None
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from ..data.images import load_image
from ..errors import ImageReadError

__all__ = ["THUMB", "data_uri", "thumbnail_uri", "thumbnail_uris", "picture_uri"]

THUMB = 112          # px on the longer side: 1,000 thumbnails of photos take about 4 MB
_QUALITY = 80


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def picture_uri(im: Image.Image, side: int = THUMB) -> str:
    """A picture (an overlay, a thumbnail already made) as a JPEG ``data:`` URI, ``side`` px on its longer side."""
    im = im.convert("RGB")
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=_QUALITY, optimize=True)
    return data_uri(buf.getvalue(), "image/jpeg")


def thumbnail_uri(path: str | Path, side: int = THUMB) -> str | None:
    """A thumbnail of the image file at ``path``, or None when it cannot be read (moved, deleted, broken)."""
    try:
        im = load_image(Path(path), min_size=side)  # a JPEG decodes at a reduced scale: fast
    except (ImageReadError, OSError, ValueError):
        return None
    return picture_uri(im, side)


def thumbnail_uris(paths, side: int = THUMB, threads: int = 2) -> dict[str, str | None]:
    """``thumbnail_uri`` of each distinct path, decoded in ``threads`` threads (Pillow releases the GIL)."""
    unique = list(dict.fromkeys(str(p) for p in paths))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return dict(zip(unique, pool.map(lambda p: thumbnail_uri(p, side), unique)))
