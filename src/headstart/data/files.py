"""Which files are images: extensions, hidden files and OS debris, and a folder expanded to its image files.

Plain ``os`` and ``pathlib`` only, so a command can find and count its images (and fail on a wrong path)
before torch is imported.

    >>> image_files("photos/")          # sorted, recursive, hidden files and folders skipped
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "is_image_name", "is_junk_name", "image_files"]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})

_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})


def is_junk_name(name: str) -> bool:
    """Hidden files and folders and OS debris (``.DS_Store``, ``__MACOSX``, ``.ipynb_checkpoints``...)."""
    return name.startswith(".") or name in _JUNK_NAMES


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files below ``folder`` by name, recursively, in sorted order; hidden ones and debris skipped."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_junk_name(d))
        out += [Path(dirpath) / f for f in sorted(filenames) if not is_junk_name(f) and is_image_name(f)]
    return out
