"""Feature extraction through a frozen backbone, and the on-disk feature cache.

A cache entry is keyed by the backbone (name + weights digest), the data config, the view
(plain or an augmented view) and the image file's content, so a second training on the same
images runs no backbone pass.

    >>> result = extract_features(backbone, paths, cache=FeatureCache.default())
    >>> result.features.shape, result.computed, result.cached
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data.pipeline import decoded_batches, default_decode_threads
from .data.transforms import RESAMPLING, EvalTransform, decode_size
from .errors import ConfigError, ImageReadError, StorageError

__all__ = ["FeatureCache", "Extraction", "extract_features", "file_digest", "default_threads", "entry_bytes",
           "cache_key", "features_shape", "atomic_write"]

log = logging.getLogger("headstart")


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the image-content part of a cache key)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:32]


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` then rename, so a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FeatureCache:
    """Per-image feature files under ``root/<namespace>/``, each with a content digest checked on read."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.corrupt: list[str] = []  # entries found damaged and recomputed, for the run's report
        self.damage: dict[str, str] = {}  # entry -> what was wrong with it
        self.write_error: str | None = None  # set when writing failed (disk full...); the run goes on uncached

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

    def get(self, ns: str, digest: str) -> torch.Tensor | None:
        p = self._path(ns, digest)
        if not p.exists():
            return None
        try:
            with safe_open(str(p), "pt") as f:  # the digest lives in the header's metadata
                expected = (f.metadata() or {}).get("sha256")
                # a private copy: the checked bytes are the served bytes, even if the file changes later
                t = f.get_tensor("features").clone()
            if expected == _tensor_digest(t):
                return t
            reason = "digest mismatch"
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
            reason = f"{type(exc).__name__}: {str(exc)[:100]}"
        log.warning("feature cache entry %s is damaged (%s); recomputing it", p, reason)
        self.corrupt.append(str(p))
        self.damage[str(p)] = reason
        p.unlink(missing_ok=True)
        return None

    def put(self, ns: str, digest: str, features: torch.Tensor) -> None:
        """Store one entry atomically. A failed write (disk full, permissions) is logged once and later
        writes are skipped: the features are still used, only not kept."""
        if self.write_error is not None:
            return
        t = torch.from_numpy(features.detach().numpy().copy())  # a compact copy, made without torch's threads
        meta = {"sha256": _tensor_digest(t)}
        try:
            atomic_write(self._path(ns, digest), lambda tmp: save_file({"features": t}, tmp, metadata=meta))
        except (OSError, SafetensorError) as exc:
            self._write_failed(exc)

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
        stored = 0
        if key is not None and (self.root / self.namespace(key)).is_dir():
            stored = sum(1 for _ in (self.root / self.namespace(key)).glob("*/*.safetensors"))
        n_images = max(0, n_images - stored)
        need = n_images * entry_bytes(feature_shape)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".write-test.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            raise StorageError(f"The feature cache folder {str(self.root)!r} cannot be written "
                               f"({type(exc).__name__}: {exc.strerror or exc}). Point --cache (or $HEADSTART_CACHE) "
                               "to a writable folder, or use --no-cache.") from exc
        if free < need:
            raise StorageError(f"The feature cache in {str(self.root)!r} needs about {_mb(need)} for {n_images} "
                               f"images ({_mb(entry_bytes(feature_shape))} each) but its disk has {_mb(free)} free. "
                               "Free some space, point --cache to a bigger disk, or use --no-cache.")


def cache_key(backbone, view: dict | None = None) -> dict:
    """What a cache entry's features depend on besides the image: backbone, weights, preprocessing, view."""
    return {"backbone": backbone.name, "weights": backbone.weights_digest,
            "data_config": backbone.data_config.to_dict(), "resampling": RESAMPLING, "view": view or "eval"}


POOLS = (None, "avg")


def features_shape(backbone, pool: str | None = None) -> tuple[int, ...]:
    """Shape of one image's features: the feature map ``(C, H, W)``, or ``(C,)`` averaged (``pool="avg"``)."""
    return (backbone.feature_shape[0],) if pool == "avg" else tuple(backbone.feature_shape)


def entry_bytes(feature_shape: Sequence[int]) -> int:
    """Bytes one cache entry takes on disk: float32 features plus the safetensors header (~200 bytes)."""
    return 4 * math.prod(feature_shape) + 256


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.1f} GB"


@dataclass
class Extraction:
    """Features of the images that could be read, in input order, and a report of those that could not."""

    features: torch.Tensor            # (n_ok, *feature_shape)
    ok: list[int]                     # indices into the input paths
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    failed: dict[int, str] = field(default_factory=dict)          # input index -> reason
    digests: list[str | None] = field(default_factory=list)      # per input path
    computed: int = 0                 # images that went through the backbone
    cached: int = 0                   # images served from the cache
    recomputed: list[tuple[str, str, str]] = field(default_factory=list)  # (image, damaged cache entry, why)


def _safe_digest(path) -> str | ImageReadError:
    try:
        return file_digest(path)
    except OSError as exc:
        return ImageReadError(path, f"cannot be read ({exc.strerror or exc})")


def extract_features(
    backbone,
    paths: Sequence[str | Path],
    cache: FeatureCache | None = None,
    *,
    transform: Callable | None = None,
    batch_size: int = 32,
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    threads: int | None = None,
    progress: bool | None = None,
    desc: str = "features",
    engine: str = "auto",
    decode_threads: int | None = None,
    pool: str | None = None,
) -> Extraction:
    """Run ``paths`` through ``backbone`` (frozen, eval mode), reusing and filling ``cache``.

    ``transform`` defaults to the eval transform; another one must have ``spec()`` (its part of the cache
    key) and, with ``keyed = True``, takes the image's content digest to seed its random draw.
    Unreadable files are reported in ``errors``, never raised.
    ``runner`` replaces ``backbone`` for the forward pass (an inference engine over the same graph); without
    one, a runner for ``engine`` (``auto``, ``torch``, ``onnx``; see ``headstart.engines``) is made when
    some image is not in the cache. Images are decoded in ``decode_threads`` threads (default: two on two
    cores) while the backbone runs; each batch's features go to the cache as soon as they are computed.
    ``pool="avg"`` returns each feature map's average over positions, ``(C,)``: all that an averaging head
    reads, in 1/(H*W) of the memory (1/49 for efficientnet_lite0 at 224). The cache keeps whole maps either
    way, so a later run with another head still finds every image there.

    Raises:
        ConfigError: an unknown ``engine`` or ``pool``. EngineError: ``engine="onnx"`` cannot run this backbone.
    """
    if pool not in POOLS:
        raise ConfigError(f"pool {pool!r} is not one of {POOLS}")
    threads = threads or default_threads()
    transform = transform or EvalTransform(backbone.data_config)
    key = cache_key(backbone, transform.spec() if hasattr(transform, "spec") else None)
    shape = features_shape(backbone, pool)
    ns = FeatureCache.namespace(key)
    if cache is not None:
        cache.describe(ns, key)
    n = len(paths)
    out = torch.empty((n, *shape), dtype=torch.float32)
    have = torch.zeros(n, dtype=torch.bool)
    errors: dict[int, str] = {}
    recomputed: list[tuple[str, str, str]] = []
    with ThreadPoolExecutor(max_workers=max(2, threads)) as hashing:
        # content digests key the cache, seed augmented views, and find the same image twice: always taken
        digests = list(hashing.map(_safe_digest, paths))
        todo = []
        for i, d in enumerate(digests):
            if isinstance(d, ImageReadError):
                errors[i] = d.reason
                digests[i] = None
                continue
            n_corrupt = len(cache.corrupt) if cache is not None else 0
            hit = cache.get(ns, d) if cache is not None else None
            if cache is not None and len(cache.corrupt) > n_corrupt:
                entry = cache.corrupt[-1]
                recomputed.append((str(paths[i]), entry, cache.damage.get(entry, "damaged")))
            if hit is not None and tuple(hit.shape) == tuple(backbone.feature_shape):
                out[i] = torch.from_numpy(_average(hit.numpy())) if pool == "avg" else hit
                have[i] = True
            else:
                todo.append(i)
    if todo and runner is None:
        from .engines import make_runner  # engines import this module

        runner = make_runner(backbone, engine, batch_size, threads=threads, cache=cache)
    computed = _run_backbone(backbone, runner, paths, todo, digests, out, have, errors, cache, ns, transform,
                             batch_size, decode_threads or default_decode_threads(threads), progress, desc, pool)
    ok = [i for i in range(n) if have[i]]
    err_list = [(str(paths[i]), errors[i]) for i in sorted(errors)]
    for p, reason in err_list:
        log.warning("skipped %s: %s", p, reason)
    if len(ok) < n:  # compact in place: a second copy of every feature would double peak memory
        for j, i in enumerate(ok):
            if i != j:
                out[j] = out[i]
        out = out[:len(ok)]
    return Extraction(out, ok, err_list, dict(sorted(errors.items())), digests,
                      computed, len(ok) - computed, recomputed)


def _run_backbone(backbone, runner, paths, todo, digests, out, have, errors, cache, ns, transform,
                  batch_size, decode_threads, progress, desc, pool=None) -> int:
    if not todo:
        return 0
    runner = runner or backbone
    was_training = backbone.training
    backbone.eval()
    computed = 0
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=None if progress is None else not progress,
               leave=False)
    # cache entries are written by one thread while the next batch runs: hashing and writing a batch of
    # feature maps took ~6% of the wall time of efficientnet_lite0 extraction when done in between batches
    writer = _CacheWriter(cache, ns) if cache is not None else None
    out_np = out.numpy()
    try:
        for idx, batch, failed in decoded_batches(paths, todo, transform, batch_size,
                                                  min_size=decode_size(backbone.data_config),
                                                  threads=decode_threads, keys=digests):
            errors.update(failed)
            if idx:
                with torch.inference_mode():
                    feats = runner(batch)
                # in numpy: torch's copies would wake its OpenMP team (see data.pipeline._stack)
                out_np[idx] = _average(feats.numpy()) if pool == "avg" else feats.numpy()
                have[idx] = True
                if writer is not None:
                    writer.put([digests[i] for i in idx], feats)
                computed += len(idx)
            bar.update(len(idx) + len(failed))
    finally:
        if writer is not None:
            writer.close()
        bar.close()
        backbone.train(was_training)
    return computed


def _average(maps: np.ndarray) -> np.ndarray:
    """Feature maps ``(..., C, H, W)`` -> their averages ``(..., C)``; in numpy, like the copies around it."""
    return maps.mean(axis=(-2, -1), dtype=np.float32)


class _CacheWriter:
    """Stores batches of features in ``cache`` from one background thread, at most ``pending`` batches behind.

    ``close()`` waits for what was handed in; entries are written atomically, so an interrupt leaves only
    whole ones.
    """

    def __init__(self, cache: FeatureCache, ns: str, pending: int = 2):
        self.cache, self.ns, self.pending = cache, ns, pending
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="headstart-cache-write")
        self.futures: list = []

    def put(self, digests: list[str | None], feats: torch.Tensor) -> None:
        while len(self.futures) >= self.pending:
            self.futures.pop(0).result()
        self.futures.append(self.pool.submit(self._store, digests, feats))

    def _store(self, digests, feats) -> None:
        for j, d in enumerate(digests):
            if d is not None:
                self.cache.put(self.ns, d, feats[j])

    def close(self) -> None:
        try:
            for f in self.futures:
                f.result()
        finally:
            self.pool.shutdown(wait=True)
