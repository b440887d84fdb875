"""The predictor: a trained model turning image files into ``(label, probability, top-k)`` rows.

    >>> rows = Predictor(model).predict(["photos/"], top_k=3)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .data.images import is_image_name, is_junk_name
from tqdm.auto import tqdm

from .data.augment import FlipView
from .data.pipeline import decoded_batches, default_decode_threads
from .data.shards import ShardMember, shard_images
from .data.transforms import EvalTransform, decode_size
from .engines import LazyRunner
from .errors import ConfigError
from .export import OnnxModel
from .features import Extraction, FeatureCache, default_threads, extract_features, features_shape

__all__ = ["Predictor", "collect_images"]


def collect_images(inputs: Iterable[str | Path]) -> list[Path | ShardMember]:
    """Files as given, folders expanded recursively to their image files (sorted, hidden ones skipped), tar
    shards (a ``.tar`` file or pattern) to the images in them."""
    out: list[Path | ShardMember] = []
    for item in inputs:
        p = Path(item)
        if str(item).endswith(".tar"):
            out += shard_images(item)
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not is_junk_name(d))
                out += [Path(dirpath) / f for f in sorted(filenames) if not is_junk_name(f) and is_image_name(f)]
        else:
            out.append(p)  # a named file is always tried; a bad one becomes an error row
    return out


class Predictor:
    """Batched prediction with a model's own preprocessing; bad files give error rows, never a crash.

    ``model`` is an ``ImageModel`` or an exported ``OnnxModel``. For an ``ImageModel``, ``engine``
    (``auto``, ``torch``, ``onnx``) runs the backbone unless a ``runner`` is given, and images go through
    in chunks of ``chunk`` so memory stays flat for any number of files. With ``tta``, probabilities are
    averaged over each image and its mirror image.

    Raises:
        ConfigError: ``engine="torch"`` for an exported ONNX model.
    """

    def __init__(self, model, batch_size: int = 32, runner=None, engine: str = "auto", chunk: int = 1024,
                 tta: bool = False):
        self.model = model.eval()
        self.tta = tta
        self.batch_size = batch_size
        self.chunk = max(batch_size, chunk)
        if isinstance(model, OnnxModel):
            if engine == "torch":
                raise ConfigError(f"{model.path} is an exported ONNX model and runs on ONNX Runtime only; "
                                  "drop --engine torch, or predict from the run folder")
            self.runner = model
        else:
            self.runner = runner if runner is not None else LazyRunner(model.backbone, engine, batch_size)

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    def probabilities(self, paths: list[Path], cache: FeatureCache | None = None, progress=None):
        """``(probs (N, n_classes) with NaN rows for unreadable files, errors {index: reason}, extraction)``.

        Over more than ``chunk`` files, or for an ONNX model, the extraction's ``features`` are empty.
        """
        if isinstance(self.model, OnnxModel):
            return self._onnx_probabilities(paths, progress)
        probs = np.full((len(paths), len(self.classes)), np.nan, dtype=np.float32)
        parts = []
        views = [None, FlipView(self.model.data_config)] if self.tta else [None]
        for start in range(0, max(1, len(paths)), self.chunk):
            part = paths[start:start + self.chunk]
            for v, transform in enumerate(views):
                ex = extract_features(self.model.backbone, part, cache, transform=transform,
                                      batch_size=self.batch_size, runner=self.runner, progress=progress,
                                      desc="predict", pool=self.model.head.feature_pool)
                if ex.ok:
                    with torch.inference_mode():
                        p = self.model.head(ex.features).softmax(-1).numpy()
                    rows = [start + i for i in ex.ok]
                    probs[rows] = p if v == 0 else (probs[rows] * v + p) / (v + 1)
                if v == 0:
                    parts.append((start, ex))
        if len(parts) == 1:
            return probs, parts[0][1].failed, parts[0][1]
        merged = Extraction(
            torch.empty((0, *features_shape(self.model.backbone, self.model.head.feature_pool))),
            [s + i for s, ex in parts for i in ex.ok], [e for _, ex in parts for e in ex.errors],
            {s + i: r for s, ex in parts for i, r in ex.failed.items()}, [d for _, ex in parts for d in ex.digests],
            sum(ex.computed for _, ex in parts), sum(ex.cached for _, ex in parts))
        return probs, merged.failed, merged

    def _onnx_probabilities(self, paths: list[Path], progress=None):
        cfg = self.model.data_config
        probs = np.full((len(paths), len(self.classes)), np.nan, dtype=np.float32)
        failed: dict[int, str] = {}
        ok: list[int] = []
        bar = tqdm(total=len(paths), desc="predict", unit="img", leave=False,
                   disable=None if progress is None else not progress)
        views = [EvalTransform(cfg), FlipView(cfg)] if self.tta else [EvalTransform(cfg)]
        try:
            for v, transform in enumerate(views):
                for idx, batch, errors in decoded_batches(paths, range(len(paths)), transform, self.batch_size,
                                                          min_size=decode_size(cfg),
                                                          threads=default_decode_threads(default_threads())):
                    if v == 0:
                        failed.update(errors)
                        ok += idx
                        bar.update(len(idx) + len(errors))
                    if idx:
                        p = self.model.probabilities(batch)
                        probs[idx] = p if v == 0 else (probs[idx] * v + p) / (v + 1)
        finally:
            bar.close()
        failed = dict(sorted(failed.items()))
        ex = Extraction(torch.empty((0,)), ok, [(str(paths[i]), r) for i, r in failed.items()], failed,
                        [None] * len(paths), len(ok), 0)
        return probs, failed, ex

    def predict(self, inputs: Iterable[str | Path], top_k: int = 1, progress=None) -> list[dict]:
        """Rows ``{"path", "label", "probability", "top_k": [{"label", "probability"}], "error"}``."""
        paths = collect_images(inputs)
        probs, errors, _ = self.probabilities(paths, progress=progress)
        k = max(1, min(top_k, len(self.classes)))
        rows = []
        for i, p in enumerate(paths):
            if i in errors:
                rows.append({"path": str(p), "label": None, "probability": None, "top_k": [], "error": errors[i]})
                continue
            order = np.argsort(-probs[i])[:k]
            top = [{"label": self.classes[j], "probability": float(probs[i, j])} for j in order]
            rows.append({"path": str(p), "label": top[0]["label"], "probability": top[0]["probability"],
                         "top_k": top, "error": None})
        return rows
