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
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data.pipeline import decoded_batches, default_decode_threads
from .data.transforms import EvalTransform, decode_size
from .errors import ImageReadError

__all__ = ["FeatureCache", "Extraction", "extract_features", "file_digest", "default_threads"]

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
        if not p.exists():
            atomic_write(p, lambda tmp: Path(tmp).write_text(json.dumps(key, indent=1, sort_keys=True)))

    def get(self, ns: str, digest: str) -> torch.Tensor | None:
        p = self._path(ns, digest)
        if not p.exists():
            return None
        try:
            with safe_open(str(p), "pt") as f:  # the digest lives in the header's metadata
                expected = (f.metadata() or {}).get("sha256")
                t = f.get_tensor("features")
            if expected == _tensor_digest(t):
                return t
            reason = "digest mismatch"
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
            reason = f"{type(exc).__name__}"
        log.warning("feature cache entry %s is damaged (%s); recomputing it", p, reason)
        self.corrupt.append(str(p))
        p.unlink(missing_ok=True)
        return None

    def put(self, ns: str, digest: str, features: torch.Tensor) -> None:
        t = features.detach().contiguous().clone()
        meta = {"sha256": _tensor_digest(t)}
        atomic_write(self._path(ns, digest), lambda tmp: save_file({"features": t}, tmp, metadata=meta))


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
    view: dict | None = None,
    transform: Callable | None = None,
    batch_size: int = 32,
    runner: Callable[[torch.Tensor], torch.Tensor] | None = None,
    threads: int | None = None,
    progress: bool | None = None,
    desc: str = "features",
    engine: str = "auto",
    decode_threads: int | None = None,
) -> Extraction:
    """Run ``paths`` through ``backbone`` (frozen, eval mode), reusing and filling ``cache``.

    ``view`` names the transform for the cache key (``None`` = the plain eval transform); ``transform``
    must then be given. Unreadable files are reported in ``errors``, never raised.
    ``runner`` replaces ``backbone`` for the forward pass (an inference engine over the same graph); without
    one, a runner for ``engine`` (``auto``, ``torch``, ``onnx``; see ``headstart.engines``) is made when
    some image is not in the cache. Images are decoded in ``decode_threads`` threads (default: two on two
    cores) while the backbone runs; each batch's features go to the cache as soon as they are computed.

    Raises:
        ConfigError: an unknown ``engine``. EngineError: ``engine="onnx"`` cannot run this backbone.
    """
    threads = threads or default_threads()
    transform = transform or EvalTransform(backbone.data_config)
    key = {"backbone": backbone.name, "weights": backbone.weights_digest,
           "data_config": backbone.data_config.to_dict(), "view": view or "eval"}
    ns = FeatureCache.namespace(key)
    if cache is not None:
        cache.describe(ns, key)
    n = len(paths)
    out = torch.empty((n, *backbone.feature_shape), dtype=torch.float32)
    have = torch.zeros(n, dtype=torch.bool)
    errors: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=max(2, threads)) as pool:
        digests = list(pool.map(_safe_digest, paths)) if cache is not None else [None] * n
        todo = []
        for i, d in enumerate(digests):
            if isinstance(d, ImageReadError):
                errors[i] = d.reason
                digests[i] = None
                continue
            hit = cache.get(ns, d) if cache is not None else None
            if hit is not None and tuple(hit.shape) == tuple(backbone.feature_shape):
                out[i] = hit
                have[i] = True
            else:
                todo.append(i)
    if todo and runner is None:
        from .engines import make_runner  # engines import this module

        runner = make_runner(backbone, engine, batch_size, threads=threads, cache=cache)
    computed = _run_backbone(backbone, runner, paths, todo, digests, out, have, errors, cache, ns, transform,
                             batch_size, decode_threads or default_decode_threads(threads), progress, desc)
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
                      computed, len(ok) - computed)


def _run_backbone(backbone, runner, paths, todo, digests, out, have, errors, cache, ns, transform,
                  batch_size, decode_threads, progress, desc) -> int:
    if not todo:
        return 0
    runner = runner or backbone
    was_training = backbone.training
    backbone.eval()
    computed = 0
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=None if progress is None else not progress,
               leave=False)
    try:
        for idx, batch, failed in decoded_batches(paths, todo, transform, batch_size,
                                                  min_size=decode_size(backbone.data_config),
                                                  threads=decode_threads):
            errors.update(failed)
            if idx:
                computed += _forward(runner, idx, batch, digests, out, have, cache, ns)
            bar.update(len(idx) + len(failed))
    finally:
        bar.close()
        backbone.train(was_training)
    return computed


def _forward(runner, idx, batch, digests, out, have, cache, ns) -> int:
    with torch.inference_mode():
        feats = runner(batch)
    for j, i in enumerate(idx):
        out[i] = feats[j]
        have[i] = True
        if cache is not None and digests[i] is not None:
            cache.put(ns, digests[i], feats[j])
    return len(idx)
