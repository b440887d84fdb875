"""The predictor: a trained model turning images into ``(label, probability, top-k)`` rows.

    >>> rows = Predictor(model).predict(["photos/"], top_k=3)
    >>> rows = Predictor(model).predict_images([png_bytes], names=["upload.png"])

The model is an ``ImageModel`` or an exported ``OnnxModel``: both give a feature source, a runner and
``scores`` (see ``headstart.model``), so batching and test-time augmentation are written once, here.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import torch

from .backbones.concat import ConcatBackbone, refuse_concatenation
from .cache import FeatureCache
from .data.augment import FlipView
from .data.images import ImageSource, load_pixels, source_name
from .data.inputs import collect_images as _collect_files
from .data.shards import shard_images
from .data.transforms import EvalTransform, decode_size
from .errors import ConfigError
from .features import Extraction, extract_features
from .hardware import Hardware

__all__ = ["Predictor", "collect_images"]


def collect_images(inputs: Iterable[ImageSource]) -> list[ImageSource]:
    """Paths as given, folders expanded recursively to their image files (sorted, hidden ones skipped), tar
    shards (a ``.tar`` file or pattern) to the images in them; bytes, pictures and arrays pass through."""
    out: list[ImageSource] = []
    for item in inputs:
        if isinstance(item, (str, os.PathLike)) and str(item).endswith(".tar"):
            out += shard_images(item)
        else:
            out += _collect_files([item])
    return out


class Predictor:
    """Batched prediction with a model's own preprocessing; bad images give error rows, never a crash.

    ``engine`` (``auto``, ``torch``, ``onnx``) runs the backbone unless a ``runner`` is given; images go
    through in chunks of ``chunk`` so memory stays flat for any number of files. With ``tta``, probabilities
    are averaged over each image and its mirror image.

    Raises:
        ConfigError: ``engine="torch"`` for an exported ONNX model.
    """

    def __init__(self, model, batch_size: int = 32, runner=None, engine: str = "auto", chunk: int = 1024,
                 tta: bool = False, hardware: Hardware | None = None, cache: FeatureCache | None = None):
        self.model = model.eval()
        self.tta = tta
        self.batch_size = batch_size
        self.chunk = max(batch_size, chunk)
        self.runner = runner if runner is not None else model.make_runner(engine, batch_size, hardware=hardware,
                                                                          cache=cache)

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    def _views(self) -> list:
        """The transforms of each view; for a concatenation, each view is one transform per member."""
        kinds = (EvalTransform, FlipView) if self.tta else (EvalTransform,)
        source = self.model.feature_source
        if isinstance(source, ConcatBackbone):
            return [[kind(cfg) for cfg in source.data_configs] for kind in kinds]
        return [kind(self.model.data_config) for kind in kinds]

    def probabilities(self, images: Sequence[ImageSource], cache: FeatureCache | None = None, progress=None,
                      names: Sequence[str] | None = None):
        """``(probs (N, n_classes) with NaN rows for unreadable images, errors {index: reason}, extraction)``.

        ``extraction.computed`` and ``extraction.cached`` count backbone passes and cache hits over every view
        (with ``tta``, each image is seen twice: ``extraction.views`` is 2). Over more than ``chunk`` images the
        extraction's ``features`` are empty.
        """
        names = list(names) if names is not None else [source_name(im, f"<image {i}>") for i, im in enumerate(images)]
        probs = np.full((len(images), len(self.classes)), np.nan, dtype=np.float32)
        parts, computed, cached = [], 0, 0
        views = self._views()
        for start in range(0, max(1, len(images)), self.chunk):
            part = images[start:start + self.chunk]
            for v, transform in enumerate(views):
                ex = extract_features(self.model.feature_source, part, cache, transform=transform,
                                      batch_size=self.batch_size, runner=self.runner, progress=progress,
                                      desc="predict" if v == 0 else "predict (mirrored)",
                                      pool=self.model.feature_pool, names=names[start:start + self.chunk])
                computed, cached = computed + ex.computed, cached + ex.cached
                if ex.ok:
                    rows = [start + i for i in ex.ok]
                    p = self.model.scores(ex.features)
                    probs[rows] = p if v == 0 else (probs[rows] * v + p) / (v + 1)
                if v == 0:
                    parts.append((start, ex))
        merged = parts[0][1] if len(parts) == 1 else _merged(parts)
        merged.computed, merged.cached, merged.views = computed, cached, len(views)
        return probs, merged.failed, merged

    def predict(self, inputs: Iterable[ImageSource], top_k: int = 1, progress=None) -> list[dict]:
        """Rows ``{"path", "label", "probability", "top_k": [{"label", "probability"}], "error"}``; folders
        are expanded to their images."""
        return self.predict_images(collect_images(inputs), top_k=top_k, progress=progress)

    def predict_images(self, images: Sequence[ImageSource], names: Sequence[str] | None = None, top_k: int = 1,
                       progress=None) -> list[dict]:
        """``predict``'s rows for in-memory images (bytes, file objects, pictures, arrays) or paths, named by
        ``names`` in the rows' ``path`` (default: their paths, or ``<image i>``).

        Raises:
            ConfigError: ``top_k`` below 1.
        """
        _check_top_k(top_k)
        names = list(names) if names is not None else [source_name(im, f"<image {i}>") for i, im in enumerate(images)]
        probs, errors, _ = self.probabilities(images, progress=progress, names=names)
        return [self.row(name, probs[i], errors.get(i), top_k) for i, name in enumerate(names)]

    def row(self, name: str, probs: np.ndarray | None, error: str | None = None, top_k: int = 1) -> dict:
        """One result row: the top ``top_k`` classes of ``probs``, or the ``error`` that kept it from a result."""
        if error is not None or probs is None:
            return {"path": name, "label": None, "probability": None, "top_k": [], "error": error}
        k = max(1, min(top_k, len(self.classes)))
        order = np.argsort(-probs)[:k]
        top = [{"label": self.classes[j], "probability": float(probs[j])} for j in order]
        return {"path": name, "label": top[0]["label"], "probability": top[0]["probability"], "top_k": top,
                "error": None}

    # -- the pieces a server batches itself: decode in worker threads, then one engine call ------------------
    def prepare(self, image: ImageSource, name: str | None = None) -> torch.Tensor:
        """One image decoded and transformed for the model, ``(3, H, W)``.

        Raises:
            ImageReadError: not a readable image (the reason says why).
            ConfigError: a concatenated model (each member prepares images its own way).
        """
        refuse_concatenation(self.model.feature_source, "serving prepared batches (headstart serve)")
        pixels = load_pixels(image, min_size=decode_size(self.model.data_config), name=name)
        return EvalTransform(self.model.data_config)(pixels)

    def probabilities_of_batch(self, batch: torch.Tensor) -> np.ndarray:
        """Class probabilities ``(N, classes)`` of prepared images ``(N, 3, H, W)``; with ``tta``, averaged with
        their mirror images (flipping a normalised tensor equals the mirrored view: the transform is per pixel)."""
        views = [batch, torch.from_numpy(np.ascontiguousarray(batch.numpy()[..., ::-1]))] if self.tta else [batch]
        out = None
        for v, x in enumerate(views):
            feats = self.runner(x)
            if self.model.feature_pool == "avg" and feats.ndim == 4:
                feats = feats.mean(dim=(2, 3))
            p = self.model.scores(feats)
            out = p if out is None else (out * v + p) / (v + 1)
        return out


def _check_top_k(top_k) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k must be a whole number of at least 1, got {top_k!r} (--top-k 1 gives the best "
                          "class, --top-k 3 the three most probable)")


def _merged(parts: list[tuple[int, Extraction]]) -> Extraction:
    return Extraction(
        torch.empty((0,)), [s + i for s, ex in parts for i in ex.ok], [e for _, ex in parts for e in ex.errors],
        {s + i: r for s, ex in parts for i, r in ex.failed.items()}, [d for _, ex in parts for d in ex.digests],
        sum(ex.computed for _, ex in parts), sum(ex.cached for _, ex in parts))
