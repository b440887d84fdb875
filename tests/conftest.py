"""Shared fixtures: small generated image folders, an isolated feature cache, offline hub, the fast tier's
classifier settings, and a recorder of the files a piece of code opens."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network


def _own_cores() -> None:
    """Under pytest-xdist, worker i of n keeps every n-th core of the ones it may use, before torch loads.

    Each worker (and every process a test starts: affinity is inherited) then sees only its cores, so torch and
    ONNX Runtime size their pools to them; n workers each sizing a pool for the whole machine would spin-wait on
    each other's cores. The code that splits work over several cores is tested with explicit thread and lane
    counts, which do not depend on the machine."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not (worker and count and hasattr(os, "sched_setaffinity")):
        return
    cpus, n, i = sorted(os.sched_getaffinity(0)), int(count), int(worker.removeprefix("gw"))
    os.sched_setaffinity(0, set(cpus[i::n]) if n <= len(cpus) else {cpus[i % len(cpus)]})


_own_cores()

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera_data"
VGG16_NOTOP = SHARED / "weights" / "vgg16_imagenet_notop.safetensors"

# The fast tier's classifier: test_tiny (6k parameters, its own 32x32 input, "pretrained" weights that are a
# fixed seeded draw available offline), so every process builds the same backbone and can share a cache.
# Enough epochs that a head on its features separates the generated colour classes.
# The fast tier's runs train the head as given and fine-tune at a fixed rate: the head search and the learning-rate
# range test have their own tests (test_select, test_lr_find) and would cost every other test seconds
FAST = dict(backbone="test_tiny", epochs=30, patience=30, head_search="off", finetune_lr=1e-4)
FAST_CLI = ["--backbone", "test_tiny", "--epochs", "5", "--head-search", "off", "--finetune-lr", "1e-4"]


def fuzz_examples(fast_tier: int) -> int:
    """Examples per fuzz test: ``fast_tier`` (what a run of seconds affords), or ``$HEADSTART_FUZZ_EXAMPLES``
    for a long hunt. A failing example is kept in hypothesis' database and tried first next time."""
    return int(os.environ.get("HEADSTART_FUZZ_EXAMPLES", fast_tier))


def pytest_configure(config):
    gc.disable()  # collection imports torch, timm and every test module: see pytest_collection_finish


def pytest_collection_finish(session):
    """The libraries and test modules are loaded: their objects live as long as the session, so the cyclic
    collector stops scanning them (each full collection over them took a quarter of a second)."""
    gc.freeze()
    gc.enable()


def pytest_unconfigure(config):
    """The session is over: the interpreter's exit skips a cycle collection over torch's and timm's objects
    (as the headstart command does, headstart.cli.command)."""
    gc.freeze()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "feature-cache"))


def png_header(width: int, height: int, *, bits: int = 8, colour: int = 2) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels (RGB by default) but holds almost none: a
    decompression bomb's header, or an image over a pixel budget, in about 100 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bits, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def make_image(path: Path, colour, size=(40, 32), seed=0, fmt=None):
    """A noisy picture dominated by ``colour`` (a class signal a random conv net can still see)."""
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(colour, dtype=np.float32) + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint8)).save(path, format=fmt)
    return path


COLOURS = {"blue": (40, 60, 200), "red": (200, 50, 40), "green": (40, 190, 60)}


def make_folder(root: Path, classes=("blue", "red"), per_class=8, val_per_class=4, seed=0) -> Path:
    for split, n in (("train", per_class), ("val", val_per_class)):
        for ci, c in enumerate(classes):
            for i in range(n):
                make_image(root / split / c / f"{c}_{i}.png", COLOURS[c], seed=seed * 1000 + ci * 100 + i
                           + (50 if split == "val" else 0))
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data")


def needs_shared(*paths):
    missing = [p for p in paths if not Path(p).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"needs {missing} (../shared beside the checkout)")


def weights_file(path: Path, backbone: str = "test_tiny", input_size: int | None = None) -> Path:
    """A weights file for ``backbone`` (its seeded random initialisation): given it, processes build the same
    backbone, load it through the ``--weights FILE`` path, and share a cache."""
    from safetensors.torch import save_file

    from headstart import create_backbone

    state = create_backbone(backbone, weights=None, input_size=input_size).body.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


# -- which files a piece of code opens: Python's audit hook sees every open() and os.open() ----------------

_WATCHERS: list = []
_inside = threading.local()


def _audit(event, args):
    if event != "open" or not _WATCHERS or getattr(_inside, "busy", False) or not args:
        return
    if not isinstance(args[0], (str, bytes, os.PathLike)):
        return  # a file descriptor
    path = Path(os.fsdecode(args[0]))
    writing = bool((args[2] if len(args) > 2 and isinstance(args[2], int) else 0) & (os.O_WRONLY | os.O_RDWR))
    _inside.busy = True
    try:
        for watch in list(_WATCHERS):
            watch(path, writing)
    finally:
        _inside.busy = False


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one acts only while a watcher is registered


@contextlib.contextmanager
def watching_opens(watch):
    """Call ``watch(path, writing)`` on every file opened (by any thread) inside the block; an exception it
    raises is raised by that ``open``."""
    _WATCHERS.append(watch)
    try:
        yield
    finally:
        _WATCHERS.remove(watch)


@contextlib.contextmanager
def recording_opens():
    """The paths of the files opened inside the block, in order (files opened inside Rust are not seen)."""
    opened: list[str] = []
    with watching_opens(lambda path, writing: opened.append(str(path))):
        yield opened


@contextlib.contextmanager
def refusing_reads(root: Path, what: str = "feature extraction started"):
    """Any image file under ``root`` opened inside the block fails the test (raised from that ``open``, so it
    reaches the caller from a worker thread too); the long work starts by reading the images."""
    root = Path(root).resolve()
    opened: list[str] = []

    def watch(path, writing):
        if path.resolve().is_relative_to(root) and path.suffix.lower() in {".png", ".jpg", ".jpeg", ".gif"}:
            opened.append(str(path))
            raise AssertionError(f"{what}: {path} was opened")

    with watching_opens(watch):
        yield opened
    assert not opened, f"{what}: {opened[:3]}"


@contextlib.contextmanager
def disk_full_under(root: Path, kind: str = ".safetensors"):
    """Writing a ``kind`` file under ``root`` (its temporary file too: the name holds the final one) fails as on
    a full disk: the file is created, then ENOSPC. Small files of other kinds still fit. Yields the refused
    paths."""
    root = Path(root).resolve()
    refused: list[str] = []

    def watch(path, writing):
        if writing and kind in path.name and path.resolve().is_relative_to(root):
            refused.append(str(path))
            path.touch()  # created, then the write fails: what is left behind must be cleaned up
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with watching_opens(watch):
        yield refused
