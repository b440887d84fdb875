"""What a caller may pass as images, made into a list: one image, a folder, or a list of either.

    >>> images, one = image_inputs("photos/")          # the folder's image files; one is False
    >>> images, one = image_inputs("cat.jpg")          # [Path("cat.jpg")]; one is True: give one result back

``predict``, ``predict_proba`` and anything else that takes images from a person (an explanation, a score)
read their argument through ``image_inputs``, so they all take the same things.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .files import image_files
from .shards import shard_images

__all__ = ["image_inputs", "collect_images"]

_ONE = (bytes, bytearray, memoryview, Image.Image)
_EXPECTED = ("a path (str or Path) to an image file or a folder, bytes, a binary file object, a PIL image, a uint8 "
             "array (H, W, 3) or a batch (N, H, W, 3), or a list of these")


def collect_images(inputs: Iterable) -> list:
    """Paths as given, folders expanded recursively to their image files (sorted, hidden ones skipped);
    bytes, file objects, pictures and arrays pass through. An item that is no image is kept: reading it
    gives its error row."""
    out: list = []
    for item in inputs:
        if isinstance(item, (str, os.PathLike)) and str(item).endswith(".tar"):
            out += shard_images(item)  # a tar shard or a pattern of them: the images inside
        elif isinstance(item, (str, os.PathLike)):
            out += image_files(item) if Path(item).is_dir() else [Path(item)]
        else:
            out.append(item)
    return out


def image_inputs(data) -> tuple[list, bool]:
    """``(images, one)``: ``data`` as a list of image sources (``data.images.ImageSource``), and whether it
    was a single image (a caller then gives one result, not a list).

    One image: a path to a file (str or ``Path``), bytes, a binary file object, a PIL image, or an array
    ``(H, W)`` / ``(H, W, C)``. Several: a folder (its image files, as the CLI expands it), an array
    ``(N, H, W, C)``, or a list, tuple or other iterable of paths, folders and images.

    Raises:
        ConfigError: ``data`` is none of these (a number, ``None``, a dict, a torch tensor...).
    """
    if isinstance(data, (str, os.PathLike)) and str(data).endswith(".tar"):
        return shard_images(data), False
    if isinstance(data, (str, os.PathLike)):
        return (image_files(data), False) if Path(data).is_dir() else ([Path(data)], True)
    if isinstance(data, _ONE) or (hasattr(data, "read") and not isinstance(data, (list, tuple))):
        return [data], True
    if isinstance(data, np.ndarray):
        if data.ndim == 4:
            return list(data), False
        return [data], True
    if type(data).__module__.split(".")[0] == "torch":
        raise ConfigError(f"got a torch {type(data).__name__}; pass images as {_EXPECTED} (a tensor's pixels: "
                          "tensor.permute(1, 2, 0).numpy() as uint8)")
    if isinstance(data, (dict, set)) or not isinstance(data, Iterable):
        raise ConfigError(f"got {type(data).__name__} {str(data)[:60]!r}; expected {_EXPECTED}")
    return collect_images(data), False
