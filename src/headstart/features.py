"""Feature extraction through a frozen backbone, filling and reusing the feature cache (``headstart.cache``).

A cache entry is keyed by the backbone (name + weights digest), the data config, the view (plain or an
augmented view) and the image's content, so a second training on the same images runs no backbone pass.

    >>> result = extract_features(backbone, paths, cache=FeatureCache.default())
    >>> result.features.shape, result.computed, result.cached

Each image is read once: its content digest (the cache key) and its pixels come from the same bytes.
"""

from __future__ import annotations

import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones.base import EXTRACTION_BATCH
from .backbones.concat import ConcatBackbone
from .cache import ENTRY_FORMAT, FeatureCache, entry_bytes
from .data.images import ImageSource, content_digest, read_source, source_name
from .data.pipeline import decoded_batches, default_decode_threads, map_ahead
from .data.transforms import RESAMPLING, EvalTransform, decode_size
from .engines import LazyRunner, run_batches
from .errors import ConfigError, ImageReadError
from .hardware import default_threads
from .protocols import FeatureSource, Runner, Transform

__all__ = ["FeatureCache", "Extraction", "extract_features", "file_digest", "entry_bytes", "cache_key",
           "features_shape", "POOLINGS", "members"]

log = logging.getLogger("headstart")

POOLINGS = (None, "avg")  # what a cache entry holds: the whole feature map, or its average over positions


def file_digest(path: str | Path) -> str:
    """The content digest of an image file (the image part of a cache key)."""
    return content_digest(read_source(path))


def members(source) -> list:
    """The backbones that extraction runs for ``source``: a concatenation's members, else ``source`` alone."""
    return list(source.members) if isinstance(source, ConcatBackbone) else [source]


def cache_key(source: FeatureSource, view: dict | None = None, pool: str | None = None) -> dict:
    """What a cache entry's features depend on besides the image: backbone, weights, preprocessing, view, and
    whether the entries are whole maps or their averages (``pool="avg"``)."""
    key = {"backbone": source.name, "weights": source.weights_digest, "data_config": source.data_config.to_dict(),
           "resampling": RESAMPLING, "view": view or "eval", "entries": ENTRY_FORMAT}
    if pool is not None:
        key["pool"] = pool
    return key


def features_shape(source: FeatureSource, pool: str | None = None) -> tuple[int, ...]:
    """Shape of one image's features: the feature map ``(C, H, W)``, or ``(C,)`` averaged (``pool="avg"``)."""
    return (source.feature_shape[0],) if pool == "avg" else tuple(source.feature_shape)


@dataclass
class Extraction:
    """Features of the images that could be read, in input order, and a report of those that could not."""

    features: torch.Tensor            # (n_ok, *feature_shape)
    ok: list[int]                     # indices into the input images
    errors: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    failed: dict[int, str] = field(default_factory=dict)          # input index -> reason
    digests: list[str | None] = field(default_factory=list)      # per input image
    computed: int = 0                 # images that went through the backbone
    cached: int = 0                   # images served from the cache
    # (image, damaged cache entry, why); image None: a shard with an unreadable header, whose images are unknown
    recomputed: list[tuple[str | None, str, str]] = field(default_factory=list)
    views: int = 1                    # views of each image that ``computed`` and ``cached`` count (TTA: 2)


def extract_features(
    source: FeatureSource,
    images: Sequence[ImageSource],
    cache: FeatureCache | None = None,
    *,
    transform: Transform | None = None,
    batch_size: int = EXTRACTION_BATCH,
    runner: Runner | None = None,
    engine: str = "auto",
    threads: int | None = None,
    decode_threads: int | None = None,
    progress: bool | None = None,
    desc: str = "features",
    pool: str | None = None,
    names: Sequence[str] | None = None,
) -> Extraction:
    """Run ``images`` (paths, bytes, pictures: see ``data.images.ImageSource``) through ``source`` (a frozen
    backbone, eval mode), reusing and filling ``cache``.

    ``transform`` defaults to the eval transform; its ``spec()`` is its part of the cache key. ``runner`` runs
    the forward pass (an inference engine over the same graph); without one, a ``LazyRunner`` for ``engine``
    is made, which builds nothing when every image is in the cache. Unreadable images are reported in
    ``errors`` (named by ``names``, default: their paths), never raised. ``pool="avg"`` keeps (and caches)
    each feature map's average over positions, ``(C,)``: all an averaging head reads; averages are also served
    from maps an earlier run stored.

    A ``ConcatBackbone`` runs each member with its own transform and cache entries (its averages), and the
    features are the members' joined (``ConcatBackbone.join``) for the images every member read; ``transform``
    is then one per member (default: each member's eval transform), ``runner`` a ``ConcatRunner``, and
    ``computed`` and ``cached`` count the images of every member.

    Raises:
        ConfigError: an unknown ``pool`` or ``engine``. EngineError: ``engine="onnx"`` cannot run ``source``.
    """
    if pool not in POOLINGS:
        raise ConfigError(f"pool {pool!r} is not one of {POOLINGS}")
    if isinstance(source, ConcatBackbone):
        transforms = transform or [None] * len(source.members)
        runners = runner.members if runner is not None else [None] * len(source.members)
        parts = [extract_features(m, images, cache, transform=t, batch_size=batch_size, runner=r, engine=engine,
                                  threads=threads, decode_threads=decode_threads, progress=progress,
                                  desc=f"{desc} ({m.name})", pool="avg", names=names)
                 for m, t, r in zip(source.members, transforms, runners)]
        return _joined(parts)
    threads = threads or default_threads()
    job = _Job(source, images, cache, transform or EvalTransform(source.data_config), pool, batch_size,
               names, progress, desc)
    hashing = ThreadPoolExecutor(max_workers=max(2, threads), thread_name_prefix="headstart-digest")
    try:
        todo = job.misses(hashing)
        first = next(todo, None)
        if first is not None:
            runner = runner or LazyRunner(source, engine, batch_size, threads=threads, cache=cache)
            job.compute(runner, itertools.chain([first], todo), threads, decode_threads)
    finally:
        hashing.shutdown(wait=True, cancel_futures=True)
        job.bar.close()
    return job.result()


def _joined(parts: list[Extraction]) -> Extraction:
    """The members' extractions as one: features joined for the images read by every member."""
    ok = sorted(set.intersection(*(set(ex.ok) for ex in parts)))
    rows = []
    for ex in parts:
        where = {i: j for j, i in enumerate(ex.ok)}
        rows.append(ex.features[[where[i] for i in ok]])
    failed = {}
    for ex in parts:
        failed |= {i: r for i, r in ex.failed.items() if i not in failed}
    first = parts[0]
    errors = list(first.errors) + [e for ex in parts[1:] for e in ex.errors if e not in first.errors]
    return Extraction(ConcatBackbone.join(rows), ok, errors, dict(sorted(failed.items())), first.digests,
                      sum(ex.computed for ex in parts), sum(ex.cached for ex in parts),
                      [r for ex in parts for r in ex.recomputed])


class _Job:
    """One extraction: where its features go (``out``), what each image's digest and bytes are, and the
    cache namespaces it reads and fills."""

    def __init__(self, source, images, cache, transform, pool, batch_size, names, progress, desc):
        self.source, self.images, self.cache, self.transform = source, images, cache, transform
        self.pool, self.batch_size = pool, batch_size
        self.names = list(names) if names is not None else [source_name(im, f"<image {i}>")
                                                              for i, im in enumerate(images)]
        key = cache_key(source, transform.spec(), pool)
        self.ns = FeatureCache.namespace(key)
        # averages are also served from the maps of an earlier run with a flattening head
        self.maps_ns = FeatureCache.namespace(cache_key(source, transform.spec())) if pool is not None else None
        self.shape = features_shape(source, pool)
        n = len(images)
        self.out = torch.empty((n, *self.shape), dtype=torch.float32)
        self.have = torch.zeros(n, dtype=torch.bool)
        self.errors: dict[int, str] = {}
        self.digests: list[str | None] = [None] * n
        self.buffers: dict[int, object] = {}  # bytes read for hashing, kept until decoded
        self.recomputed: list[tuple[str | None, str, str]] = []
        self.computed = 0
        self.bar = tqdm(total=n, desc=desc, unit="img", disable=None if progress is None else not progress,
                        leave=False)
        if cache is not None:
            self._open_cache(key)

    def _open_cache(self, key: dict) -> None:
        self.cache.describe(self.ns, key)
        n_corrupt = len(self.cache.corrupt)
        for ns in (self.ns, self.maps_ns) if self.maps_ns else (self.ns,):
            self.cache.index(ns, refresh=True)  # other processes may have stored shards since this cache looked
        # a shard whose header is unreadable names no image: reported with the images it held unknown
        self.recomputed += [(None, e, self.cache.damage.get(e, "damaged")) for e in self.cache.corrupt[n_corrupt:]]

    def misses(self, hashing: ThreadPoolExecutor) -> Iterator[int]:
        """Indices of the images to compute, as they are read and hashed (at most two batches ahead, so the
        backbone starts on the first miss while later images are still read); cache hits are filled in."""
        for i, got in map_ahead(hashing, self._read, range(len(self.images)), 2 * self.batch_size):
            if isinstance(got, ImageReadError):
                self._failed(i, got.reason)
                continue
            data, self.digests[i] = got
            if self._from_cache(i):
                continue
            self.buffers[i] = data
            yield i

    def _read(self, i: int):
        try:
            data = read_source(self.images[i])
            return data, content_digest(data)
        except ImageReadError as exc:
            return exc

    def _failed(self, i: int, reason: str) -> None:
        self.errors[i] = reason
        self.bar.update(1)

    def _from_cache(self, i: int) -> bool:
        if self.cache is None:
            return False
        n_corrupt = len(self.cache.corrupt)
        hit = self.cache.get(self.ns, self.digests[i])
        if hit is not None and tuple(hit.shape) != self.shape:
            hit = None
        if hit is None and self.maps_ns:
            maps = self.cache.get(self.maps_ns, self.digests[i])
            if maps is not None and tuple(maps.shape) == tuple(self.source.feature_shape):
                hit = torch.from_numpy(_average(maps.numpy()))
        self.recomputed += [(self.names[i], e, self.cache.damage.get(e, "damaged"))
                            for e in self.cache.corrupt[n_corrupt:]]
        if hit is None:
            return False
        self.out[i], self.have[i] = hit, True
        self.bar.update(1)
        return True

    def compute(self, runner: Runner, todo: Iterator[int], threads: int, decode_threads: int | None) -> None:
        """Decode the images in ``todo`` from the bytes already read, run them through ``runner`` and store
        their features (in ``out``, and in the cache from a writer thread while the next batch runs)."""
        was_training = self.source.training
        self.source.eval()
        writer = _CacheWriter(self.cache, self.ns) if self.cache is not None else None
        # an engine that takes turns with the input pipeline (``Runner.read_ahead`` False) has every core while
        # it runs: decoding then uses them all, and cache writes are done before its next pass
        read_ahead = runner.read_ahead
        decode_threads = decode_threads or (default_decode_threads(threads) if read_ahead else threads)
        out_np = self.out.numpy()
        try:
            batches = self._batches(todo, decode_threads, read_ahead, writer)
            for idx, feats in run_batches(runner, batches):
                # in numpy: torch's copies would wake its OpenMP team (see data.pipeline._stack)
                kept = _average(feats.numpy()) if self.pool == "avg" else feats.numpy()
                out_np[idx] = kept
                self.have[idx] = True
                if writer is not None:  # what this run keeps, as it keeps it: the cache key says which
                    writer.put([self.digests[i] for i in idx], kept)
                self.computed += len(idx)
                self.bar.update(len(idx))
        finally:
            if writer is not None:
                writer.close()
            self.source.train(was_training)

    def _batches(self, todo, decode_threads, read_ahead, writer):
        buffered = _Buffered(self.buffers)
        for idx, batch, failed in decoded_batches(buffered, todo, self.transform, self.batch_size,
                                                  min_size=decode_size(self.source.data_config),
                                                  threads=decode_threads, keys=self.digests, read_ahead=read_ahead):
            for i, reason in failed:
                self._failed(i, reason)
            if idx:
                if writer is not None and not read_ahead:
                    writer.wait()
                yield idx, batch

    def result(self) -> Extraction:
        n = len(self.images)
        ok = [i for i in range(n) if self.have[i]]
        err_list = [(self.names[i], self.errors[i]) for i in sorted(self.errors)]
        for name, reason in err_list:
            log.warning("skipped %s: %s", name, reason)
        out = self.out
        if len(ok) < n:  # compact in place: a second copy of every feature would double peak memory
            for j, i in enumerate(ok):
                if i != j:
                    out[j] = out[i]
            out = out[:len(ok)]
        return Extraction(out, ok, err_list, dict(sorted(self.errors.items())), self.digests,
                          self.computed, len(ok) - self.computed, self.recomputed)


class _Buffered:
    """The bytes read for hashing, handed to the decoders once each (then dropped, so memory stays bounded)."""

    def __init__(self, buffers: dict[int, object]):
        self.buffers = buffers

    def __getitem__(self, i: int):
        return self.buffers.pop(i)


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

    def put(self, digests: list[str | None], feats: np.ndarray) -> None:
        while len(self.futures) >= self.pending:
            self.futures.pop(0).result()
        self.futures.append(self.pool.submit(self.cache.put_many, self.ns, digests, feats))

    def wait(self) -> None:
        """Return when every batch handed in is stored."""
        while self.futures:
            self.futures.pop(0).result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)

