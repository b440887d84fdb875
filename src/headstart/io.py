"""Files written whole or not at all: every file headstart writes goes through ``atomic_write``.

    >>> write_json(run / "metrics.json", metrics)
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write", "write_json", "write_text", "read_json", "finite_json", "FILE_MODE", "DIR_MODE"]


def _umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)  # read once, at import: os.umask can only be read by setting it
        os.umask(mask)
        return mask


# what open() gives a new file; libraries that write through a private temporary file (safetensors) make it
# owner-only, and a run's files should all be readable alike
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()  # what mkdir() gives a new folder


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` then rename, so a reader sees the old file or the new one; the file
    gets ``FILE_MODE`` (a plain new file's permissions), whoever wrote it.

    The temporary name is unique per process and thread (no two writes of one path overlap in a thread),
    which costs less than ``mkstemp``'s random draw and file creation.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        write(str(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def finite_json(obj):
    """``obj`` with every non-finite float (an undefined metric) turned into ``None``: JSON has no NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return finite_json(obj.item())
    return obj


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented, strict JSON: values JSON lacks (paths) are written as their text, NaN as null."""
    write_text(path, json.dumps(finite_json(obj), indent=2, default=str, allow_nan=False) + "\n")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


def read_json(text: str):
    """Strict JSON: NaN, Infinity and numbers past a float's range are refused, and so is nesting deeper than
    Python's stack; each raises ``ValueError`` (``json.JSONDecodeError`` is one)."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None
