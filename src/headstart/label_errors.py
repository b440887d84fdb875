"""Training images whose label is probably wrong, and near-duplicate pairs filed under two classes, from cached
features alone (no backbone pass): confident learning (``cleanlab``) over out-of-fold probabilities.

    >>> found = find_label_errors(features, labels, classes, paths)
    >>> found.suspects[0]         # {"path": ..., "given": "ants", "suggested": "bees", "quality": 0.03, "rank": 1}
    >>> found.agreement           # 0.96: the out-of-fold head predicts 96% of the given labels

The out-of-fold probabilities come from a logistic-regression head trained k times (stratified folds) on the
pooled features: each image is judged by a head that never saw it, so a wrong label cannot vouch for itself.
cleanlab ranks the images by its label quality score (the probability of the given label) and decides how
many to flag (``find_label_issues``: the off-diagonal mass of the confident joint), so no constant sets the count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import DatasetError

__all__ = ["LabelErrors", "find_label_errors", "near_duplicates", "same_class_level", "DUPLICATE_SIMILARITY"]

# Cosine similarity of centred, L2-normalised pooled features above which two images count as near-duplicates.
# Midway between the two populations benchmarks/label_errors.py measures on hymenoptera with efficientnet_lite0:
# re-encoded, resized or cropped copies of a photo score 0.81 and up against it, while no photo's most similar
# *other* photo scores above 0.69 (docs/explain.md).
DUPLICATE_SIMILARITY = 0.75
_CHUNK = 2048  # rows of the similarity matrix computed at once: 2048 x N floats


@dataclass
class LabelErrors:
    """``suspects``: images cleanlab flags, most likely wrong first (``{"path", "given", "suggested", "quality",
    "rank"}``; quality is the out-of-fold probability of the given label: low = likely wrong). ``duplicates``:
    near-duplicate pairs in different classes (``{"a", "b", "similarity", "labels": [la, lb]}``), most similar
    first. ``quality``: every image's score, in input order. ``agreement``: the share of images whose given label
    the out-of-fold head predicts; when it is well below the trained model's accuracy, the check's own mistakes
    (hard images) are among the suspects. ``seconds``: the time it took."""

    suspects: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    quality: list[float] = field(default_factory=list)
    seconds: float = 0.0
    agreement: float | None = None


def _pooled(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    if x.ndim == 4:  # feature maps (N, C, H, W): what the head pools
        x = x.mean(axis=(2, 3))
    if x.ndim != 2:
        raise DatasetError(f"features must be (N, D) or (N, C, H, W), got shape {x.shape}")
    return x


def out_of_fold_probabilities(x: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = 5,
                              seed: int = 0) -> np.ndarray:
    """``(N, n_classes)`` probabilities, each row from a logistic regression fitted without that image."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    counts = np.bincount(labels, minlength=n_classes)
    k = int(min(folds, counts[counts > 0].min()))
    if k < 2 or (counts > 0).sum() < 2:
        raise DatasetError(f"finding label errors needs at least 2 classes with 2 images each; got per-class "
                           f"counts {counts.tolist()}")
    # unit-length features and scikit-learn's default C: standardising them too (as the trained head does) lets
    # a few hundred images fit their flipped labels, and the flips then look right (benchmarks/RESULTS.md)
    head = make_pipeline(Normalizer(), LogisticRegression(max_iter=2000))
    probs = cross_val_predict(head, x, labels, cv=StratifiedKFold(k, shuffle=True, random_state=seed),
                              method="predict_proba")
    full = np.zeros((len(x), n_classes))
    full[:, np.unique(labels)] = probs  # a class with no image gets probability 0
    return full


def near_duplicates(x: np.ndarray, labels: np.ndarray, classes: list[str], paths: list[str],
                    threshold: float = DUPLICATE_SIMILARITY) -> list[dict]:
    """Pairs of images in different classes whose features' cosine similarity is at least ``threshold``, and more
    alike than images of one class are to their closest neighbour in it (``same_class_level``): on data whose
    images all look alike to the backbone (small scans of digits, one texture throughout), two different images
    score as high as a re-encoded copy does on photos, and are not reported."""
    z = _pooled(x)
    z = z - z.mean(0)  # centred: what all images share (the backbone's bias) would make every pair look alike
    z /= np.linalg.norm(z, axis=1, keepdims=True).clip(1e-12)
    # one pass over the similarities: the pairs above the fixed threshold, and each image's closest class-mate
    candidates, best = [], np.full(len(z), -1.0, dtype=np.float32)
    for start in range(0, len(z), _CHUNK):
        sims = z[start:start + _CHUNK] @ z.T
        rows, cols = np.nonzero(sims >= threshold)
        candidates += [(i, j, float(sims[i - start, j])) for i, j in zip(rows + start, cols)
                       if j > i and labels[i] != labels[j]]
        sims[labels[start:start + _CHUNK, None] != labels[None, :]] = -1.0
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -1.0  # not itself
        best[start:start + len(sims)] = sims.max(axis=1)
    level = same_class_level(best)
    pairs = [{"a": paths[i], "b": paths[j], "similarity": round(sim, 4),
              "labels": [classes[labels[i]], classes[labels[j]]]} for i, j, sim in candidates if sim >= level]
    return sorted(pairs, key=lambda p: -p["similarity"])


def same_class_level(best: np.ndarray, share: float = 0.95) -> float:
    """How alike distinct images of one class get: the ``share`` quantile of ``best``, each image's similarity to
    its most similar other image in its own class (-1 for an image alone in its class).

    A copy filed under another class does not enter it (its class-mates are other pictures), so it stands out
    above this level; the quantile leaves room for copies within a class (up to 1 - ``share`` of the images)."""
    best = best[best > -1.0]
    return float(np.quantile(best, share)) if len(best) else -1.0


def find_label_errors(features: np.ndarray, labels: np.ndarray, classes: list[str], paths: list[str], *,
                      folds: int = 5, seed: int = 0, threshold: float = DUPLICATE_SIMILARITY) -> LabelErrors:
    """Likely label errors among ``paths`` and near-duplicates across classes, from their cached features.

    ``features``: ``(N, D)`` pooled features (or ``(N, C, H, W)`` maps, averaged here); ``labels``: ``(N,)``
    class indices into ``classes``. Nothing is removed; the caller lists the suspects.

    Raises:
        DatasetError: mismatched lengths, or a data set too small for folds (fewer than 2 images in a class).
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    t0 = time.perf_counter()
    x = _pooled(features)
    labels = np.asarray(labels, dtype=np.int64)
    if not len(x) == len(labels) == len(paths):
        raise DatasetError(f"{len(x)} feature rows, {len(labels)} labels and {len(paths)} paths; expected one each "
                           "per image")
    probs = out_of_fold_probabilities(x, labels, len(classes), folds, seed)
    quality = get_label_quality_scores(labels, probs)
    flagged = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    suspects = [{"path": str(paths[i]), "given": classes[labels[i]], "suggested": classes[int(probs[i].argmax())],
                 "quality": round(float(quality[i]), 4), "rank": r}
                for r, i in enumerate(flagged, start=1)]
    duplicates = near_duplicates(x, labels, classes, [str(p) for p in paths], threshold)
    agreement = float((probs.argmax(1) == labels).mean())
    return LabelErrors(suspects, duplicates, [float(q) for q in quality], time.perf_counter() - t0, agreement)
