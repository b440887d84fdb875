"""Files written whole or not at all: every file headstart writes goes through ``atomic_write``.

    >>> write_json(run / "metrics.json", metrics)
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "write_json", "write_text"]


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` then rename, so a reader sees the old file or the new one.

    The temporary name is unique per process and thread (no two writes of one path overlap in a thread),
    which costs less than ``mkstemp``'s random draw and file creation.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented JSON; values JSON lacks (paths, numpy scalars) are written as their text."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
