"""What a report shows about a model's predictions on labelled images: metrics, the most-confused pairs, the top
losses and the calibration (scikit-learn underneath; no plotting here).

    >>> preds = Predictions(paths, labels, probs, classes, "validation set")
    >>> top_losses(preds, 16)[0]
    {'path': 'val/bees/x.jpg', 'true': 'bees', 'predicted': 'ants', 'probability': 0.97, 'p_true': 0.03, ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..evaluation import classification_metrics

__all__ = ["Predictions", "most_confused", "top_losses", "calibration"]


@dataclass
class Predictions:
    """A model's class probabilities on labelled images: ``probs`` ``(N, classes)`` has a NaN row for each image
    that could not be read (``errors`` {index: reason}); ``labels`` are class indices; ``name`` says what the
    images are ("validation set", a folder)."""

    paths: list[str]
    labels: np.ndarray
    probs: np.ndarray
    classes: list[str]
    name: str
    errors: dict[int, str] = field(default_factory=dict)
    backbone_passes: int | None = None
    from_cache: int | None = None

    @property
    def ok(self) -> np.ndarray:
        """Indices of the images that were read."""
        return np.flatnonzero(~np.isnan(self.probs).any(axis=1))

    def metrics(self) -> dict:
        ok = self.ok
        return classification_metrics(self.labels[ok], self.probs[ok].argmax(1), self.classes)


def most_confused(confusion: list[list[int]], classes: list[str], k: int = 10) -> list[dict]:
    """The ``k`` largest off-diagonal cells: ``{"true", "predicted", "count", "share"}`` (share of the true class),
    most frequent first, as fastai's ``most_confused``."""
    cm = np.asarray(confusion)
    totals = cm.sum(axis=1)
    cells = [(int(cm[i, j]), i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [{"true": classes[i], "predicted": classes[j], "count": n, "share": n / totals[i]}
            for n, i, j in cells[:k]]


def top_losses(preds: Predictions, k: int) -> list[dict]:
    """The ``k`` read images with the highest cross-entropy loss (the lowest probability of their true class):
    ``{"path", "true", "predicted", "probability" (of the predicted class), "p_true", "loss"}``."""
    ok = preds.ok
    p_true = preds.probs[ok, preds.labels[ok]].astype(np.float64)
    loss = -np.log(np.clip(p_true, 1e-12, 1.0))
    order = np.argsort(-loss, kind="stable")[:k]
    rows = []
    for j in order:
        i = ok[j]
        pred = int(preds.probs[i].argmax())
        rows.append({"path": preds.paths[i], "true": preds.classes[preds.labels[i]], "predicted": preds.classes[pred],
                     "probability": float(preds.probs[i, pred]), "p_true": float(p_true[j]), "loss": float(loss[j])})
    return rows


def calibration(preds: Predictions, bins: int = 10) -> dict:
    """Top-label calibration in ``bins`` equal-width bins of confidence (the predicted class's probability):
    ``{"confidence" (the bin's mean), "accuracy", "count", "centre"}`` per non-empty bin, and the expected calibration error ``ece`` (the
    count-weighted mean of |accuracy - confidence|)."""
    from sklearn.calibration import calibration_curve

    ok = preds.ok
    probs = preds.probs[ok]
    confidence = probs.max(axis=1).astype(np.float64)
    correct = (probs.argmax(axis=1) == preds.labels[ok]).astype(int)
    if not len(ok):
        return {"confidence": [], "accuracy": [], "count": [], "centre": [], "ece": float("nan"), "bins": bins}
    edges = np.linspace(0.0, 1.0, bins + 1)
    # the binning calibration_curve uses, for the counts it does not return
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=bins)
    centres = ((edges[:-1] + edges[1:]) / 2)[counts > 0]
    counts = counts[counts > 0]
    if correct.min() == correct.max():  # calibration_curve wants both outcomes; the per-bin figures are plain
        ids = np.searchsorted(edges[1:-1], confidence)
        conf = np.array([confidence[ids == b].mean() for b in np.unique(ids)])
        acc = np.full(len(conf), float(correct[0]))
    else:
        acc, conf = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform")
    ece = float(np.sum(counts / counts.sum() * np.abs(acc - conf)))
    return {"confidence": conf.tolist(), "accuracy": acc.tolist(), "count": counts.tolist(), "centre": centres.tolist(),
            "ece": ece, "bins": bins}
