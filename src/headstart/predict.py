"""The predictor: a trained model turning image files into ``(label, probability, top-k)`` rows.

    >>> rows = Predictor(model).predict(["photos/"], top_k=3)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .data.images import is_image_name
from .engines import LazyRunner
from .features import Extraction, FeatureCache, extract_features

__all__ = ["Predictor", "collect_images"]


def collect_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded recursively to their image files (sorted, hidden ones skipped)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
                out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".") and is_image_name(f)]
        else:
            out.append(p)  # a named file is always tried; a bad one becomes an error row
    return out


class Predictor:
    """Batched prediction with a model's own preprocessing; bad files give error rows, never a crash.

    ``engine`` (``auto``, ``torch``, ``onnx``) runs the backbone unless a ``runner`` is given. Images go
    through in chunks of ``chunk`` so memory stays flat for any number of files.
    """

    def __init__(self, model, batch_size: int = 32, runner=None, engine: str = "auto", chunk: int = 1024):
        self.model = model.eval()
        self.batch_size = batch_size
        self.runner = runner if runner is not None else LazyRunner(model.backbone, engine, batch_size)
        self.chunk = max(batch_size, chunk)

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    def probabilities(self, paths: list[Path], cache: FeatureCache | None = None, progress=None):
        """``(probs (N, n_classes) with NaN rows for unreadable files, errors {index: reason}, extraction)``.

        Over more than ``chunk`` files the extraction's ``features`` are not kept (empty); the rest is merged.
        """
        probs = np.full((len(paths), len(self.classes)), np.nan, dtype=np.float32)
        parts = []
        for start in range(0, max(1, len(paths)), self.chunk):
            part = paths[start:start + self.chunk]
            ex = extract_features(self.model.backbone, part, cache, batch_size=self.batch_size,
                                  runner=self.runner, progress=progress, desc="predict")
            if ex.ok:
                with torch.inference_mode():
                    logits = self.model.head(ex.features)
                probs[[start + i for i in ex.ok]] = logits.softmax(-1).numpy()
            parts.append((start, ex))
        if len(parts) == 1:
            return probs, parts[0][1].failed, parts[0][1]
        merged = Extraction(
            torch.empty((0, *self.model.backbone.feature_shape)),
            [s + i for s, ex in parts for i in ex.ok], [e for _, ex in parts for e in ex.errors],
            {s + i: r for s, ex in parts for i, r in ex.failed.items()}, [d for _, ex in parts for d in ex.digests],
            sum(ex.computed for _, ex in parts), sum(ex.cached for _, ex in parts))
        return probs, merged.failed, merged

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
