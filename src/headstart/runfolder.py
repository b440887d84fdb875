"""A run folder's files by name, and the checks made before a training writes one.

Plain ``os`` only (no torch), so ``headstart train`` refuses a wrong or occupied ``--out`` at once, before the
model libraries load.

    >>> check_output_folder("run"); check_new_run("run", overwrite=False, resume=False)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import StorageError

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "CHECKPOINTS", "RUN_FILES", "check_output_folder", "check_run_room", "run_files",
           "run_classes", "check_new_run", "remove_checkpoints"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINTS = "checkpoints"
# what a training writes; any of them in a folder means a run is there
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, "metrics.json", "history.csv", "data.json", CHECKPOINTS)


def check_output_folder(out: str | Path) -> None:
    """Make sure a run can be written to ``out`` before any long work, leaving no trace.

    ``out`` may exist (a folder) or not (then its nearest existing parent must be a writable folder).

    Raises:
        StorageError: ``out`` is a file, lies below a file, or cannot be written.
    """
    out = Path(out)
    probe_in = out
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise StorageError(f"Cannot write the run to {str(out)!r}: {str(probe_in)!r} is a file, not a folder. "
                           "Choose another --out.")
    try:  # os.access is not enough: it ignores read-only mounts and says yes to root
        os.rmdir(tempfile.mkdtemp(dir=probe_in, prefix=".headstart-write-test-"))
    except OSError as exc:
        raise StorageError(f"Cannot write the run to {str(out)!r}: {str(probe_in)!r} is not writable "
                           f"({type(exc).__name__}: {exc.strerror or exc}). Choose another --out or fix its "
                           "permissions.") from exc


REPORTS_BYTES = 4 * 2**20  # config, metrics, history, data.json: generous for tens of thousands of files


def check_run_room(out: str | Path, weights_bytes: int, checkpoint_bytes: int) -> None:
    """Fail before training when the disk that will hold ``out`` lacks room for the run: the weights (twice
    while a re-save replaces them), the checkpoints written as training runs, and the reports.

    Raises:
        StorageError: the free space of ``out``'s file system is below that estimate.
    """
    probe = Path(out)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    need = 2 * weights_bytes + checkpoint_bytes + REPORTS_BYTES
    free = shutil.disk_usage(probe).free
    if free < need:
        raise StorageError(f"The run in {str(out)!r} needs about {need / 2**20:.0f} MB (weights, checkpoints and "
                           f"reports) but its disk has {free / 2**20:.0f} MB free; free some space or choose "
                           "another --out")


def run_files(out: str | Path) -> list[str]:
    """The names of a run's files present in ``out`` (empty when there is no run there)."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []


def run_classes(run: str | Path) -> list[str] | None:
    """The class names in a run folder's config.json, or ``None`` (an ONNX file, or a folder that loading the
    run will say more about)."""
    try:
        config = json.loads((Path(run) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    classes = config.get("classes") if isinstance(config, dict) else None
    return [str(c) for c in classes] if isinstance(classes, list) and classes else None


def check_new_run(out: str | Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse to train into a folder that already holds a run unless told what to do with it.

    Raises:
        StorageError: ``out`` holds a run and neither ``overwrite`` nor ``resume`` is set.
    """
    found = run_files(out)
    if found and not (overwrite or resume):
        raise StorageError(f"{str(out)!r} already holds a run ({', '.join(found)}); pass --overwrite to replace it, "
                           "--resume to continue its training, or choose another --out")


def remove_checkpoints(out: str | Path) -> bool:
    """Delete ``out/checkpoints`` (a finished run no longer needs them); returns whether there were any."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return False
    shutil.rmtree(folder)
    return True
