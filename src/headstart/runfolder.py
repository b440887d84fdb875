"""A run folder's files by name, the checks made before a training writes one, its lock, and its save as one
unit (``replacing_run``).

Plain ``os`` only (no torch), so ``headstart train`` refuses a wrong or occupied ``--out`` at once, before the
model libraries load.

    >>> check_output_folder("run"); check_new_run("run", overwrite=False, resume=False)
    >>> with writing_run("run"), replacing_run("run") as new:
    ...     (new / "metrics.json").write_text("{}")   # every file of the run, then all of them at once
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import fcntl
import fnmatch
import glob
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from .errors import StorageError
from .io import DIR_MODE

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "CHECKPOINTS", "RUN_FILES", "check_output_folder", "check_run_room",
           "bind_checkpoints", "run_lock", "writing_run", "replacing_run", "run_files", "run_classes", "check_new_run",
           "remove_checkpoints"]

log = logging.getLogger("headstart")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINTS = "checkpoints"
# what a training writes; any of them in a folder means a run is there
RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, "metrics.json", "history.csv", "data.json", CHECKPOINTS)
# what headstart writes into a run folder after the save (report, plots, leaderboard, export, explain) and the
# debris of a killed write: it belongs to the run it was made from, and goes when a new run replaces it
DERIVED = ("report.html", "report-*.html", "plots", "leaderboard.json", "*.onnx", "heatmaps", ".*.tmp")


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
        _clean_leftovers(out)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


_HELD: contextvars.ContextVar[frozenset] = contextvars.ContextVar("headstart_runs_held", default=frozenset())


@contextlib.contextmanager
def writing_run(out: str | Path):
    """``run_lock(out)``, unless this thread holds it already through ``writing_run``: so ``headstart train``
    holds the run across fit, save and report, and ``ImageClassifier.fit(out=...)`` and ``save`` called on their
    own hold it too.

    Raises:
        StorageError: another process (or thread, or a ``run_lock`` of this one) holds ``out``.
    """
    key = os.path.abspath(out)
    if key in _HELD.get():
        yield
        return
    with run_lock(out):
        token = _HELD.set(_HELD.get() | {key})
        try:
            yield
        finally:
            _HELD.reset(token)


# -- a run saved as one unit ---------------------------------------------------------------------------------
# The new run is written whole into a folder beside ``out`` (``.NAME.tmp-XXXX``, the same file system), then
# swapped with ``out`` in one step (renameat2's RENAME_EXCHANGE), so a reader of ``out`` finds the old run or the
# new one, every file of it and nothing of the other. Where the exchange is not available, ``out`` is moved
# aside (``.NAME.old-XXXX``) and the new folder renamed in; a start that finds no ``out`` but an old folder puts
# it back. What the old folder held that headstart did not write (a user's notes) is moved into the new run;
# the old run's files (reports, an exported model.onnx) go with it.

def _real(out: Path) -> Path:
    """``out``, or the folder it links to: the swap replaces the folder, not a link to it."""
    return Path(os.path.realpath(out)) if out.is_symlink() else out


def _leftovers(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"))


def _derived(name: str) -> bool:
    return name in RUN_FILES or any(fnmatch.fnmatchcase(name, pattern) for pattern in DERIVED)


def _retire(old: Path, out: Path) -> None:
    """Delete a run folder that was replaced (or a new one never swapped in), first moving into ``out`` what
    headstart did not write there."""
    for entry in sorted(old.iterdir()) if old.is_dir() and not old.is_symlink() else ():
        if _derived(entry.name):
            continue
        if not out.is_dir() or os.path.lexists(out / entry.name):
            log.warning("%s holds %s, which headstart did not write, and %s has no room for it: left there", old,
                        entry.name, out)
            return
        os.rename(entry, out / entry.name)
    shutil.rmtree(old, ignore_errors=True)


def _clean_leftovers(out: Path) -> None:
    """What a save killed midway left beside ``out``: an old run moved aside puts back a missing ``out``; the
    rest is retired."""
    out = _real(out)
    old = _leftovers(out, "old")
    if old and not os.path.lexists(out):
        os.rename(old[-1], out)
        log.warning("%s: a save was interrupted before the new run was in place; the earlier run is back", out)
    for leftover in _leftovers(out, "tmp") + _leftovers(out, "old"):
        try:
            _retire(leftover, out)
        except OSError as exc:  # debris beside the run must not stop a training
            log.warning("could not clear %s, left by an interrupted save (%s); remove it by hand", leftover, exc)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); ``False`` where the system or file system lacks it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno_ = ctypes.get_errno()
    if errno_ in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(errno_, os.strerror(errno_), str(b))


def _move_into(new: Path, out: Path) -> None:
    """``out`` is a mount point and cannot be replaced: the run's files are moved in one by one instead."""
    for entry in out.iterdir():
        if _derived(entry.name) and not (new / entry.name).exists():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for entry in new.iterdir():
        if (out / entry.name).is_dir() and not (out / entry.name).is_symlink():
            shutil.rmtree(out / entry.name)
        os.replace(entry, out / entry.name)
    new.rmdir()


def _swap_in(new: Path, out: Path) -> Path | None:
    """Put the run in ``new`` at ``out``; returns the folder that now holds the old run, if any."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return None
    if os.path.ismount(out):
        _move_into(new, out)
        return None
    if _exchange(new, out):
        return new
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.rename(out, old)  # replaces the empty folder mkdtemp made
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    return old


def _link_or_copy(src: Path, dst: Path) -> None:
    """``src`` (a file or a folder of files) at ``dst`` without touching it: hard links, copies across devices."""
    if src.is_dir():
        dst.mkdir()
        for entry in src.iterdir():
            _link_or_copy(entry, dst / entry.name)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


@contextlib.contextmanager
def replacing_run(out: str | Path, keep: tuple[str, ...] = ()):
    """Yield an empty folder beside ``out`` to write a whole run into; when the block ends, it replaces ``out``
    in one step (an error in the block leaves ``out`` as it was). The entries of ``out`` named in ``keep`` (the
    checkpoints) go into the new run; entries headstart did not write are moved over to it; the rest of the old
    run is deleted. Hold ``writing_run(out)`` around it.

    Raises:
        StorageError: ``out`` is a file.
        OSError: the folder beside ``out`` cannot be written.
    """
    out = _real(Path(out))
    if os.path.lexists(out) and not out.is_dir():
        raise StorageError(f"Cannot write the run to {str(out)!r}: it is a file, not a folder. Choose another path.")
    out.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    swapped = False
    try:
        # a run folder gets a plain new folder's permissions (mkdtemp's are owner-only), or the old run's
        os.chmod(new, stat.S_IMODE(os.stat(out).st_mode) if out.is_dir() else DIR_MODE)
        for name in keep:
            if (out / name).exists():
                _link_or_copy(out / name, new / name)
        yield new
        old = _swap_in(new, out)
        swapped = True
    finally:
        if not swapped:
            shutil.rmtree(new, ignore_errors=True)
    if old is not None:
        try:
            _retire(old, out)
        except OSError as exc:  # the new run is in place; the next start retires the old one
            log.warning("the earlier run in %s was not removed (%s); the next train into %s removes it", old, exc,
                        out)


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
