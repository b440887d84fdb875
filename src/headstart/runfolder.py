"""A run folder's files by name, and the checks made before a training writes one.

Plain ``os`` only (no torch), so ``headstart train`` refuses a wrong or occupied ``--out`` at once, before the
model libraries load.

    >>> check_output_folder("run"); check_new_run("run", overwrite=False, resume=False)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import StorageError

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "CHECKPOINTS", "RUN_FILES", "check_output_folder", "check_run_room", "bind_checkpoints", "run_lock", "run_files",
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


@contextlib.contextmanager
def run_lock(out: str | Path):
    """Hold ``out`` for one writer while a run is trained and saved; a second writer is refused at once. The
    lock file lies beside ``out`` (``.NAME.lock``, removed at the end) so a refused run leaves ``out`` untouched.
    Temporary files a killed writer left in ``out`` are removed once the lock is held.

    Raises:
        StorageError: another process holds ``out``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(f"another headstart is writing a run to {str(out)!r} (it holds {str(path)!r}); wait "
                               "for it to finish or choose another --out") from None
        try:  # the holder before us may have removed the file after we opened it: lock the file that is there
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        for folder in (out, out / CHECKPOINTS):
            for tmp in folder.glob(".*.tmp") if folder.is_dir() else ():
                tmp.unlink(missing_ok=True)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


RESUME_KEY = "run.json"  # in the checkpoints folder: what the checkpoints were trained on


def bind_checkpoints(out: str | Path, key: dict, resume: bool) -> None:
    """Record what the checkpoints in ``out`` belong to (data, classes, backbone, recipe), or, on ``resume``,
    refuse checkpoints that belong to something else.

    Raises:
        StorageError: ``resume`` with checkpoints from other data, classes, backbone or recipe.
    """
    from .io import read_json, write_json

    path = Path(out) / CHECKPOINTS / RESUME_KEY
    if resume and path.is_file():
        try:
            saved = read_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            raise StorageError(f"{str(path)!r} is damaged; --resume cannot tell what the checkpoints in {str(out)!r} "
                               "belong to. Train again with --overwrite")
        differ = [part for part in key if json.dumps(saved.get(part), sort_keys=True) != json.dumps(key[part], sort_keys=True)]
        if differ:
            shown = "; ".join(f"{part}: checkpoints {_short(saved.get(part))}, now {_short(key[part])}" for part in differ)
            raise StorageError(f"--resume: the checkpoints in {str(out)!r} belong to another run ({shown}); resume "
                               "with the same data and settings, or train again with --overwrite")
        return
    if resume and any((Path(out) / CHECKPOINTS).glob("*.safetensors")):
        raise StorageError(f"--resume: the checkpoints in {str(out)!r} do not say what they were trained on (an older "
                           "headstart); train again with --overwrite")
    write_json(path, key)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def run_files(out: str | Path) -> list[str]:
    """The names of a run's files present in ``out`` (empty when there is no run there)."""
    out = Path(out)
    if not out.is_dir():
        return []
    # a checkpoints folder with no checkpoint in it (a run stopped before its first) holds nothing to resume
    return [name for name in RUN_FILES
            if (out / name).exists() and (name != CHECKPOINTS or any((out / name).glob("*.safetensors")))]


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
