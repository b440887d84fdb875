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
from .data.augment import FlipView
from .features import FeatureCache, extract_features

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
    """Batched prediction with a model's own preprocessing; bad files give error rows, never a crash."""

    def __init__(self, model, batch_size: int = 32, runner=None, tta: bool = False):
        self.model = model.eval()
        self.batch_size = batch_size
        self.runner = runner
        self.tta = tta

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    def probabilities(self, paths: list[Path], cache: FeatureCache | None = None, progress=None):
        """``(probs (N, n_classes) with NaN rows for unreadable files, errors {index: reason}, extraction)``.

        With ``tta``, probabilities are averaged over the image and its mirror image."""
        views = [None, FlipView(self.model.data_config)] if self.tta else [None]
        probs = np.full((len(paths), len(self.classes)), np.nan, dtype=np.float32)
        first = None
        for v, transform in enumerate(views):
            ex = extract_features(self.model.backbone, paths, cache, transform=transform, batch_size=self.batch_size,
                                  runner=self.runner, progress=progress, desc="predict")
            if ex.ok:
                with torch.inference_mode():
                    logits = torch.cat([self.model.head(ex.features[i:i + 4096])
                                        for i in range(0, len(ex.ok), 4096)])
                p = logits.softmax(-1).numpy()
                probs[ex.ok] = p if v == 0 else (probs[ex.ok] * v + p) / (v + 1)
            first = first or ex
        return probs, first.failed, first

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
