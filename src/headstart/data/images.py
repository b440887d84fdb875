"""Reading one image into an RGB picture, or a clear ``ImageReadError`` that callers skip and report.

An image comes as a path, as bytes, as a binary file-like object, as a Pillow picture or as a ``(H, W, 3)``
uint8 array (``ImageSource``); every form gets the same hygiene (EXIF orientation, modes, bombs, errors).
A file is read once (``read_source``), and its content digest and its pixels both come from those bytes, so
a file that changes meanwhile can never pair one content's digest with another's pixels.

``load_image`` gives a Pillow picture; ``load_pixels`` gives the same pixels as a uint8 tensor and decodes
ordinary JPEGs with simplejpeg (libjpeg-turbo with the GIL released throughout), which the input pipeline's
threads need on a small machine.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps

from ..errors import ImageReadError
from .files import IMAGE_EXTENSIONS, is_image_name, is_junk_name

__all__ = ["IMAGE_EXTENSIONS", "ImageSource", "MAX_FILE_BYTES", "MAX_PIXELS", "load_image", "load_pixels", "read_source",
           "content_digest", "source_name", "is_image_name", "is_junk_name"]

_FORMATS = {"JPEG", "PNG", "GIF", "BMP", "WEBP", "MPO"}  # MPO: phones' multi-picture JPEGs
# a photo is a few MB; a file far beyond that is not an image worth the memory of reading it whole
MAX_FILE_BYTES = int(os.environ.get("HEADSTART_MAX_IMAGE_MB", "100")) * 1_000_000
# a decoded RGB picture costs 3 bytes a pixel: 40 MP is 120 MB, a quarter of Pillow's bomb limit (179 MP)
MAX_PIXELS = int(float(os.environ.get("HEADSTART_MAX_MEGAPIXELS", "40")) * 1_000_000)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image, np.ndarray]


def source_name(src: ImageSource, default: str = "<image>") -> str:
    """How errors and result rows name ``src``: its path, a file object's ``name``, else ``default``."""
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    name = getattr(src, "name", None) if not isinstance(src, (bytes, bytearray, memoryview, np.ndarray)) else None
    return name if isinstance(name, str) else default


def read_source(src: ImageSource, max_bytes: int = MAX_FILE_BYTES) -> bytes | Image.Image | np.ndarray:
    """The encoded bytes of ``src`` (read once, at most ``max_bytes``), or the picture or array itself.

    A path must be a regular file: a FIFO, a device or a folder is refused before it is opened, so reading
    never blocks on one.

    Raises:
        ImageReadError: missing, not a regular file, empty, over ``max_bytes``, or unreadable.
    """
    if isinstance(src, (Image.Image, np.ndarray)):
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, os.PathLike)):
        data = _read_file(Path(src), max_bytes)
    elif hasattr(src, "read"):
        data = src.read(max_bytes + 1)
        if not isinstance(data, bytes):
            raise ImageReadError(source_name(src), f"was opened in text mode ({type(data).__name__}); open it "
                                 "with 'rb'")
    else:
        raise ImageReadError(repr(src)[:80], f"is a {type(src).__name__}; expected a path, bytes, a binary file, "
                             "a PIL image or a (H, W, 3) uint8 array")
    if not data:
        raise ImageReadError(source_name(src), "is an empty file (0 bytes)")
    if len(data) > max_bytes:
        raise ImageReadError(source_name(src), f"is over {max_bytes / 1e6:.0f} MB; an image that large is refused "
                             "(set HEADSTART_MAX_IMAGE_MB to raise the limit)")
    return data


def _read_file(path: Path, max_bytes: int) -> bytes:
    if "\x00" in str(path):
        raise ImageReadError(repr(str(path)), "holds a NUL character; no file has such a name: check the path")
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO, socket or device"
            raise ImageReadError(path, f"is {kind}, not a regular file")
        if st.st_size > max_bytes:
            raise ImageReadError(path, f"is {st.st_size / 1e6:.0f} MB; image files over {max_bytes / 1e6:.0f} MB "
                                 "are refused (set HEADSTART_MAX_IMAGE_MB to raise the limit)")
        # O_NONBLOCK: if the file was swapped for a FIFO since the stat, the open returns instead of waiting
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ImageReadError(path, "is not a regular file")
            return f.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise ImageReadError(path, "does not exist") from exc
    except OSError as exc:
        raise ImageReadError(path, f"cannot be read ({exc.strerror or exc})") from exc


def content_digest(data: bytes | Image.Image | np.ndarray) -> str:
    """The image-content part of a cache key: SHA-256 of a file's bytes (a picture: of its mode, size, pixels)."""
    if isinstance(data, Image.Image):
        h = hashlib.sha256(f"pil:{data.mode}:{data.size}".encode())
        h.update(data.tobytes())
    elif isinstance(data, np.ndarray):
        h = hashlib.sha256(f"array:{data.dtype}:{data.shape}".encode())
        h.update(np.ascontiguousarray(data).tobytes())
    else:
        h = hashlib.sha256(data)
    return h.hexdigest()[:32]


def load_image(src: ImageSource, min_size: int | None = None, name: str | None = None) -> Image.Image:
    """Decode ``src`` (see ``ImageSource``) as an upright RGB image; ``name`` names it in errors.

    EXIF orientation is applied; alpha is composited on white; palette, grayscale, 16-bit and CMYK
    images are converted; an animated GIF gives its first frame. With ``min_size``, a JPEG is
    decoded at the smallest power-of-two reduction whose sides stay at least ``min_size``, and any other
    image is reduced (``Image.reduce``, box averaging) right after decoding by the largest whole factor whose
    sides stay at least twice ``min_size``.

    Raises:
        ImageReadError: the file is missing, empty, not an image, truncated, or over Pillow's
            decompression-bomb limit. Nothing else escapes.
    """
    data = read_source(src)
    name = name or source_name(src)
    if isinstance(data, np.ndarray):
        return Image.fromarray(_checked_array(data, name))
    if isinstance(data, Image.Image):
        return _to_rgb(data)
    with _reading(data, name) as im:
        if min_size and im.format in ("JPEG", "MPO"):
            im.draft("RGB", (min_size, min_size))
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
        im.load()
        if min_size and im.mode in _REDUCIBLE:  # reduced before any converted copy of the full picture is made
            return _to_rgb(ImageOps.exif_transpose(_reduced(im, min_size)))
        return _reduced(_to_rgb(ImageOps.exif_transpose(im)), min_size)


def load_pixels(src: ImageSource, min_size: int | None = None, name: str | None = None) -> torch.Tensor:
    """``load_image`` as a uint8 tensor ``(3, H, W)``: the same pixels, the same errors.

    Colour JPEGs are decoded by simplejpeg with Pillow's draft reduction and libjpeg-turbo settings (the
    same pixels); everything else, and any JPEG libjpeg warns about, goes through ``load_image``.
    """
    data = read_source(src)
    name = name or source_name(src)
    if isinstance(data, np.ndarray):
        # a copy: the caller's array (perhaps read-only, as np.asarray of a picture is) is never shared
        return torch.from_numpy(np.array(_checked_array(data, name), order="C")).permute(2, 0, 1)
    if isinstance(data, Image.Image):
        return torch.from_numpy(np.array(_to_rgb(data), dtype=np.uint8)).permute(2, 0, 1)
    with _reading(data, name) as im:
        if im.format == "JPEG" and im.mode == "RGB":
            orientation = im.getexif().get(_ORIENTATION, 1)
            W, H = im.size
            f = 1
            if min_size:  # Pillow's draft: the largest of 8, 4, 2 that keeps both sides >= min_size
                f = next((s for s in (8, 4, 2) if min(W // min_size, H // min_size) >= s), 1)
            try:
                a = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-H // f), min_width=-(-W // f))
                return torch.from_numpy(_upright(a, orientation)).permute(2, 0, 1)
            except ValueError:  # strict about libjpeg's warnings; Pillow decides whether those files are readable
                pass
    return torch.from_numpy(np.array(load_image(data, min_size, name), dtype=np.uint8)).permute(2, 0, 1)


_ORIENTATION = 0x0112
# modes Image.reduce averages as the RGB conversion would see them (alpha premultiplied); the rest (palette,
# 16-bit, float) are converted first, their range stretch read from the full picture
_REDUCIBLE = {"RGB", "RGBA", "L", "LA"}


def _reduced(im: Image.Image, min_size: int | None) -> Image.Image:
    """``im`` shrunk by the largest whole factor that keeps both sides at least twice ``min_size``, so the
    copies made after decoding are small; ``im`` itself when no factor of 2 or more fits. The resize that
    follows then still shrinks at least twofold with its own antialiasing filter, which keeps the result within
    a few grey levels of resizing the full picture; box averaging down to ``min_size`` itself does not."""
    factor = min(im.size) // (2 * min_size) if min_size else 1
    return im.reduce(factor) if factor >= 2 else im


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


def _checked_array(a: np.ndarray, name: str) -> np.ndarray:
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (1, 3, 4)) or 0 in a.shape:
        raise ImageReadError(name, f"is an array of {a.dtype} {a.shape}; expected uint8 (H, W, 3), (H, W, 4) or (H, W)")
    if a.ndim == 2 or a.shape[2] == 1:
        a = np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2)
    elif a.shape[2] == 4:
        return np.asarray(_to_rgb(Image.fromarray(a, "RGBA")))
    return a


@contextmanager
def _reading(data: bytes, name: str) -> Iterator[Image.Image]:
    """The opened picture (headers read, pixels not yet); any failure inside the block is an ``ImageReadError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's per-file warnings become our skip reports
            with Image.open(io.BytesIO(data)) as im:
                if im.format not in _FORMATS:
                    raise ImageReadError(name, f"is a {im.format} file; expected JPEG, PNG, GIF, BMP or WebP")
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageReadError(name, f"is {w}x{h} pixels ({w * h / 1e6:.0f} MP); expected at most "
                                         f"{MAX_PIXELS / 1e6:.0f} MP (HEADSTART_MAX_MEGAPIXELS raises the limit). "
                                         "Downscale it")
                yield im
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, f"is too large to decode safely ({exc})") from exc
    except Exception as exc:  # Pillow raises many types on damaged files; each means "skip this one"
        kind = "truncated or damaged" if "truncat" in str(exc).lower() else "not a readable image"
        raise ImageReadError(name, f"is {kind} ({type(exc).__name__}: {str(exc)[:120]})") from exc


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
