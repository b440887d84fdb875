"""The on-disk feature cache: features of a frozen backbone per image, checked on every read.

    >>> cache = FeatureCache(root)
    >>> cache.put_many(ns, digests, features)      # one shard file per batch
    >>> cache.get(ns, digest)                      # the stored features, or None (missing or damaged)

Entries live under ``root/<namespace>/`` (one namespace per ``features.cache_key``). A batch of entries is one
shard file, ``<namespace>/<name>.safetensors``, holding one tensor per image content digest and, in its header,
each tensor's own SHA-256. Creating a file costs the kernel about as much as writing a feature map into it, so
a file per batch costs far less than a file per image (docs/cache.md). Single-entry files
``<namespace>/<xx>/<digest>.safetensors``
(``put``, and caches written before shards) are read as well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .errors import StorageError
from .io import atomic_write

__all__ = ["ENTRY_FORMAT", "FeatureCache", "entry_bytes"]

log = logging.getLogger("headstart")

_READ_ERRORS = (SafetensorError, OSError, KeyError, ValueError, RuntimeError, TypeError)


ENTRY_FORMAT = 2  # part of the feature cache key; 2: an entry's digest covers its dtype and shape, not only bytes


def _tensor_digest(t: torch.Tensor) -> str:
    # the header too: one flipped byte turns "F32" into "U32", or two swap the sides of a shape, bytes unchanged
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    h.update(np.ascontiguousarray(t.numpy()))  # hashed in place, no bytes copy
    return h.hexdigest()[:32]


def _write_entry(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: _write_bytes(tmp, data))


def _write_bytes(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _shard_members(path: Path) -> list[str]:
    """The entry names in a shard, from its header alone (so a shard whose data was cut still names them).

    Raises:
        ValueError: the header is missing, cut or not a safetensors header. OSError: unreadable file.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{len(head)} bytes, shorter than a header")
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= 100_000_000:
            raise ValueError(f"a header length of {n} bytes")
        text = f.read(n)
    if len(text) < n:
        raise ValueError("the header is cut")
    header = json.loads(text)
    if not isinstance(header, dict):
        raise ValueError("the header is not a table")
    return [k for k in header if k != "__metadata__"]


def _read_checked(path: Path, name: str, digest_key: str) -> tuple[torch.Tensor | None, str]:
    """Tensor ``name`` of a safetensors file if it matches the digest stored under ``digest_key`` in the header's
    metadata, else ``(None, what was wrong)``."""
    try:
        with safe_open(str(path), "pt") as f:
            expected = (f.metadata() or {}).get(digest_key)
            # a private copy: the checked bytes are the served bytes, even if the file changes later
            t = f.get_tensor(name).clone()
    except _READ_ERRORS as exc:
        return None, f"{type(exc).__name__}: {str(exc)[:100]}"
    if t.dtype != torch.float32:
        return None, f"stored as {t.dtype}, features are float32"
    return (t, "") if expected == _tensor_digest(t) else (None, "digest mismatch")


class FeatureCache:
    """Feature entries under ``root/<namespace>/``, in shard files of a batch each, every entry with its own
    content digest checked on read; a damaged entry is reported (``corrupt``, ``damage``) and dropped."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.corrupt: list[str] = []  # entries found damaged and recomputed, for the run's report
        self.damage: dict[str, str] = {}  # entry -> what was wrong with it
        self.write_error: str | None = None  # set when writing failed (disk full...); the run goes on uncached
        self._index: dict[str, dict[str, Path]] = {}  # namespace -> digest -> shard holding it

    @classmethod
    def default(cls) -> "FeatureCache":
        root = os.environ.get("HEADSTART_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "headstart"
        return cls(Path(root) / "features")

    @staticmethod
    def namespace(key: dict) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]

    def _path(self, ns: str, digest: str) -> Path:
        return self.root / ns / digest[:2] / f"{digest}.safetensors"

    def describe(self, ns: str, key: dict) -> None:
        p = self.root / ns / "key.json"
        if not p.exists() and self.write_error is None:
            try:
                atomic_write(p, lambda tmp: Path(tmp).write_text(json.dumps(key, indent=1, sort_keys=True)))
            except OSError as exc:
                self._write_failed(exc)

    def index(self, ns: str, refresh: bool = False) -> dict[str, Path]:
        """``digest -> shard`` for the shards in ``ns``, read from their headers (again with ``refresh``: other
        processes may have added shards). A shard whose header is unreadable is reported and deleted; its
        images are recomputed like any missing entry."""
        if refresh or ns not in self._index:
            found, bad = self._scan(ns)
            for shard, reason in bad:
                self._damaged(str(shard), reason)
                shard.unlink(missing_ok=True)
            self._index[ns] = found
        return self._index[ns]

    def _scan(self, ns: str) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
        found: dict[str, Path] = {}
        bad: list[tuple[Path, str]] = []
        folder = self.root / ns
        for shard in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
            try:
                members = _shard_members(shard)
            except FileNotFoundError:  # rewritten or dropped by another process meanwhile
                continue
            except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                bad.append((shard, f"unreadable shard header ({type(exc).__name__}: {str(exc)[:80]})"))
                continue
            for d in members:
                found.setdefault(d, shard)
        return found, bad

    def stored(self, ns: str) -> int:
        """How many images have an entry in ``ns`` (shards and single-entry files); reads, changes nothing."""
        folder = self.root / ns
        singles = {p.stem for p in folder.glob("*/*.safetensors")} if folder.is_dir() else set()
        return len(singles | set(self._scan(ns)[0]))

    def get(self, ns: str, digest: str) -> torch.Tensor | None:
        """The stored features, or ``None``: not stored, or damaged (then reported and dropped)."""
        shard = self.index(ns).get(digest)
        if shard is not None:
            t, reason = _read_checked(shard, digest, digest)
            if t is None:
                self._damaged(f"{shard}#{digest}", reason)
                self._drop(ns, shard, digest)
            return t
        p = self._path(ns, digest)  # a single-entry file
        if not p.exists():
            return None
        t, reason = _read_checked(p, "features", "sha256")
        if t is None:
            self._damaged(str(p), reason)
            p.unlink(missing_ok=True)
        return t

    def _drop(self, ns: str, shard: Path, digest: str) -> None:
        """Rewrite ``shard`` without ``digest`` (or delete it when nothing else in it can be read)."""
        self.index(ns).pop(digest, None)
        try:
            with safe_open(str(shard), "pt") as f:
                meta = f.metadata() or {}
                keep = {k: f.get_tensor(k).clone() for k in f.keys() if k != digest}
        except _READ_ERRORS:
            keep = {}
        try:
            if keep:
                _write_entry(shard, save(keep, metadata={k: meta[k] for k in keep if k in meta}))
            else:
                shard.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not drop the damaged entry %s#%s (%s)", shard, digest, exc)

    def _damaged(self, entry: str, reason: str) -> None:
        log.warning("feature cache entry %s is damaged (%s); recomputing it", entry, reason)
        self.corrupt.append(entry)
        self.damage[entry] = reason

    def put(self, ns: str, digest: str, features: torch.Tensor) -> None:
        """Store one entry in a file of its own (``put_many`` stores a batch in one file, far cheaper)."""
        if self.write_error is not None:
            return
        t = torch.from_numpy(features.detach().numpy().copy())  # a compact copy, made without torch's threads
        try:
            _write_entry(self._path(ns, digest), save({"features": t}, metadata={"sha256": _tensor_digest(t)}))
        except (OSError, SafetensorError) as exc:
            self._write_failed(exc)

    def put_many(self, ns: str, digests: Sequence[str | None], features: np.ndarray | torch.Tensor) -> None:
        """Store ``features[j]`` for each ``digests[j]`` (``None``: skipped) as one shard, atomically. A failed
        write (disk full, permissions) is logged once and later writes are skipped: the features are still
        used, only not kept."""
        if self.write_error is not None:
            return
        arr = features.detach().numpy() if isinstance(features, torch.Tensor) else features
        # compact copies made in numpy, without torch's threads; a digest met twice is stored once
        entries = {d: torch.from_numpy(arr[j].copy()) for j, d in enumerate(digests) if d is not None}
        if not entries:
            return
        meta = {d: _tensor_digest(t) for d, t in entries.items()}
        shard = self.root / ns / f"{next(iter(entries))[:12]}-{os.urandom(6).hex()}.safetensors"
        try:
            _write_entry(shard, save(entries, metadata=meta))
        except (OSError, SafetensorError) as exc:
            self._write_failed(exc)
            return
        if ns in self._index:
            for d in entries:
                self._index[ns].setdefault(d, shard)

    def _write_failed(self, exc: Exception) -> None:
        self.write_error = f"{type(exc).__name__}: {exc}"
        log.warning("cannot write to the feature cache %s (%s); going on without storing features",
                    self.root, self.write_error)

    def check_room(self, n_images: int, feature_shape: Sequence[int], key: dict | None = None) -> None:
        """Fail before extraction when the cache folder cannot be written or its disk lacks room.

        The estimate is ``n_images`` entries of ``prod(feature_shape)`` float32 values plus a header each,
        less the entries already stored under ``key`` (``cache_key``), if given.

        Raises:
            StorageError: the folder cannot be created or written, or the free space is below the estimate.
        """
        stored = self.stored(self.namespace(key)) if key is not None else 0
        n_images = max(0, n_images - stored)
        need = n_images * entry_bytes(feature_shape)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".write-test.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            if key is not None and n_images == 0:  # a read-only cache that holds every feature serves them all
                log.info("the feature cache %s cannot be written (%s); it holds every feature this run needs",
                         self.root, exc.strerror or exc)
                return
            raise StorageError(f"The feature cache folder {str(self.root)!r} cannot be written "
                               f"({type(exc).__name__}: {exc.strerror or exc}). Point --cache (or $HEADSTART_CACHE) "
                               "to a writable folder, or use --no-cache.") from exc
        if free < need:
            raise StorageError(f"The feature cache in {str(self.root)!r} needs about {_mb(need)} for {n_images} "
                               f"images ({_mb(entry_bytes(feature_shape))} each) but its disk has {_mb(free)} free. "
                               "Free some space, point --cache to a bigger disk, or use --no-cache.")


def entry_bytes(feature_shape: Sequence[int]) -> int:
    """Bytes one cache entry takes on disk: float32 features plus its part of a shard's header (~200 bytes)."""
    return 4 * math.prod(feature_shape) + 256


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.1f} GB"
