"""Feature extraction through a frozen backbone, filling and reusing the feature cache (``headstart.cache``).

A cache entry is keyed by the backbone (name + weights digest), the data config, the view
(plain or an augmented view) and the image file's content, so a second training on the same
images runs no backbone pass.

    >>> result = extract_features(backbone, paths, cache=FeatureCache.default())
    >>> result.features.shape, result.computed, result.cached
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import ENTRY_FORMAT, FeatureCache, atomic_write, entry_bytes
from .data.pipeline import decoded_batches, default_decode_threads, map_ahead
from .data.transforms import RESAMPLING, EvalTransform, decode_size
from .errors import ConfigError, ImageReadError

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


def cache_key(backbone, view: dict | None = None, pool: str | None = None) -> dict:
    """What a cache entry's features depend on besides the image: backbone, weights, preprocessing, view, and
    whether the entries are whole maps or their averages (``pool="avg"``)."""
    key = {"backbone": backbone.name, "weights": backbone.weights_digest, "data_config": backbone.data_config.to_dict(),
           "resampling": RESAMPLING, "view": view or "eval", "entries": ENTRY_FORMAT}
    if pool is not None:
        key["pool"] = pool
    return key


POOLS = (None, "avg")


def features_shape(backbone, pool: str | None = None) -> tuple[int, ...]:
    """Shape of one image's features: the feature map ``(C, H, W)``, or ``(C,)`` averaged (``pool="avg"``)."""
    return (backbone.feature_shape[0],) if pool == "avg" else tuple(backbone.feature_shape)


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
    # (image, damaged cache entry, why); image None: a shard with an unreadable header, whose images are unknown
    recomputed: list[tuple[str | None, str, str]] = field(default_factory=list)


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
    reads, in 1/(H*W) of the memory (1/49 for efficientnet_lite0 at 224). The cache then stores those averages
    too, not the maps (1/49 of the disk and of the write time); averages are also served from maps an earlier
    run stored, while a later run that needs maps computes them once.

    Raises:
        ConfigError: an unknown ``engine`` or ``pool``. EngineError: ``engine="onnx"`` cannot run this backbone.
    """
    if pool not in POOLS:
        raise ConfigError(f"pool {pool!r} is not one of {POOLS}")
    threads = threads or default_threads()
    transform = transform or EvalTransform(backbone.data_config)
    view = transform.spec() if hasattr(transform, "spec") else None
    key = cache_key(backbone, view, pool)
    shape = features_shape(backbone, pool)
    ns = FeatureCache.namespace(key)  # where this run's features are stored
    # averages are also served from the maps of an earlier run with a flattening head
    maps_ns = FeatureCache.namespace(cache_key(backbone, view)) if pool is not None else None
    recomputed: list[tuple[str | None, str, str]] = []
    if cache is not None:
        cache.describe(ns, key)
        n_corrupt = len(cache.corrupt)
        for s in (ns, maps_ns) if maps_ns else (ns,):
            cache.index(s, refresh=True)  # other processes may have stored shards since this cache last looked
        # a shard whose header is unreadable names no image: reported with the images it held unknown
        recomputed += [(None, e, cache.damage.get(e, "damaged")) for e in cache.corrupt[n_corrupt:]]
    n = len(paths)
    out = torch.empty((n, *shape), dtype=torch.float32)
    have = torch.zeros(n, dtype=torch.bool)
    errors: dict[int, str] = {}
    bar = tqdm(total=n, desc=desc, unit="img", disable=None if progress is None else not progress, leave=False)
    digests: list[str | None] = [None] * n
    hashing = ThreadPoolExecutor(max_workers=max(2, threads), thread_name_prefix="headstart-digest")

    def misses():
        # content digests key the cache, seed augmented views, and find the same image twice: always taken,
        # and taken as extraction goes, so the backbone starts on the first image missing from the cache while
        # later ones are still hashed (hashing every file first held it back ~50 ms per 400 photos)
        for i, d in map_ahead(hashing, lambda i: _safe_digest(paths[i]), range(n), 2 * batch_size):
            if isinstance(d, ImageReadError):
                errors[i] = d.reason
                bar.update(1)
                continue
            digests[i] = d
            n_corrupt = len(cache.corrupt) if cache is not None else 0
            hit = _cached(cache, ns, maps_ns, d, backbone, shape) if cache is not None else None
            if hit is not None:
                out[i] = hit
                have[i] = True
                bar.update(1)
                continue
            damaged = cache.corrupt[n_corrupt:] if cache is not None else []
            recomputed.extend((str(paths[i]), e, cache.damage.get(e, "damaged")) for e in damaged)
            yield i

    computed = 0
    try:
        todo = misses()
        first = next(todo, None)
        if first is not None:
            if runner is None:
                from .engines import make_runner  # engines import this module

                runner = make_runner(backbone, engine, batch_size, threads=threads, cache=cache)
            computed = _run_backbone(backbone, runner, paths, itertools.chain([first], todo), digests, out, have,
                                     errors, cache, ns, transform, batch_size, threads, decode_threads, bar, pool)
    finally:
        hashing.shutdown(wait=True, cancel_futures=True)
        bar.close()
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


def _cached(cache: FeatureCache, ns: str, maps_ns: str | None, digest: str, backbone, shape) -> torch.Tensor | None:
    """The features of ``shape`` stored in ``ns``, or averaged from the maps in ``maps_ns``; None when neither has
    them whole."""
    hit = cache.get(ns, digest)
    if hit is not None and tuple(hit.shape) == shape:
        return hit
    hit = cache.get(maps_ns, digest) if maps_ns else None
    if hit is not None and tuple(hit.shape) == tuple(backbone.feature_shape):
        return torch.from_numpy(_average(hit.numpy()))
    return None


def _run_backbone(backbone, runner, paths, todo, digests, out, have, errors, cache, ns, transform,
                  batch_size, threads, decode_threads, bar, pool=None) -> int:
    was_training = backbone.training
    backbone.eval()
    computed = 0
    # cache entries are written by one thread while the next batch runs: hashing and writing a batch of
    # feature maps took ~6% of the wall time of efficientnet_lite0 extraction when done in between batches
    writer = _CacheWriter(cache, ns) if cache is not None else None
    out_np = out.numpy()
    # an engine that takes turns with the input pipeline (see TorchRunner) has every core while it runs: the
    # decoding then uses them all, and the cache writes are done before its next pass
    read_ahead = getattr(runner, "read_ahead", True)
    decode_threads = decode_threads or (default_decode_threads(threads) if read_ahead else threads)
    from .engines import run_batches  # engines import this module

    def batches():
        for idx, batch, failed in decoded_batches(paths, todo, transform, batch_size,
                                                  min_size=decode_size(backbone.data_config),
                                                  threads=decode_threads, keys=digests, read_ahead=read_ahead):
            errors.update(failed)
            bar.update(len(failed))
            if idx:
                if writer is not None and not read_ahead:
                    writer.wait()
                yield idx, batch

    try:
        for idx, feats in run_batches(runner, batches()):
            # in numpy: torch's copies would wake its OpenMP team (see data.pipeline._stack)
            kept = _average(feats.numpy()) if pool == "avg" else feats.numpy()
            out_np[idx] = kept
            have[idx] = True
            if writer is not None:  # what this run keeps, as it keeps it: the cache key says which
                writer.put([digests[i] for i in idx], kept)
            computed += len(idx)
            bar.update(len(idx))
    finally:
        if writer is not None:
            writer.close()
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
        self.cache.put_many(self.ns, digests, feats)

    def wait(self) -> None:
        """Return when every batch handed in is stored."""
        while self.futures:
            self.futures.pop(0).result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)
