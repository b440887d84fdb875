"""``headstart check DATA``: the data's hygiene without training a model: unreadable files, suspect images
(placeholders, blank frames, repeats), likely label errors and near-duplicates filed under two classes.

    >>> report = check_data("photos/")
    >>> report.label_errors[:3], report.duplicates_across_classes

One backbone pass per image (served from the feature cache when a training already made it), then seconds of
work on the features (``label_errors``). Nothing is removed: the lists are for a person to look at, and
``--exclude FILE`` leaves the images a person decides against out of training.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .backbones.base import create_backbone
from .data.datasets import Dataset, load_splits, read_path_list, without_paths
from .data.suspects import find_suspects
from .features import FeatureCache, extract_features
from .hardware import default_threads
from .label_errors import find_label_errors

__all__ = ["CheckReport", "check_data"]


@dataclass
class CheckReport:
    """What ``check_data`` found; ``as_dict()`` is ``headstart check --format json``."""

    data: str
    backbone: dict
    classes: list[str]
    counts: dict[str, int]
    skipped_unreadable: list[tuple[str, str]]
    suspect_images: list[dict]
    label_errors: list[dict]
    duplicates_across_classes: list[dict]
    label_check_agreement: float | None = None  # share of given labels the check's out-of-fold head predicts
    excluded: list[str] = field(default_factory=list)
    exclude_unmatched: list[str] = field(default_factory=list)
    backbone_passes: int = 0
    from_cache: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def check_data(data: str | Path, *, val: str | Path | None = None, backbone: str = "efficientnet_lite0",
               weights: str | Path | None = "imagenet", input_size: int | None = None,
               exclude: str | Path | None = None, cache: FeatureCache | None | bool = True, engine: str = "auto",
               seed: int = 0, progress: bool | None = None) -> CheckReport:
    """Check the labelled images of ``data`` (``headstart train``'s layouts; with ``train/`` and ``val/``
    folders, both are checked, as one set).

    Raises:
        DatasetError: no usable data set at ``data``, an unreadable ``exclude`` list, or too few images per
            class for the folds of the label-error search.
        WeightsUnavailableError, UnknownBackboneError: the backbone cannot be built.
    """
    t0 = time.perf_counter()
    splits = load_splits(data, val=val, val_fraction=0.0, seed=seed)
    ds = splits.train
    if splits.val is not None:
        ds = Dataset(ds.samples + splits.val.samples, list(ds.classes), ds.root, list(ds.ignored))
    excluded, unmatched = [], []
    if exclude is not None:
        ds, excluded, unmatched = without_paths(ds, read_path_list(exclude), Path(exclude).parent)
    model = create_backbone(backbone, weights, input_size).freeze()
    store = FeatureCache.default() if cache is True else (cache or None)
    t1 = time.perf_counter()
    ex = extract_features(model, ds.paths, store, pool="avg", engine=engine, progress=progress, desc="check features")
    t2 = time.perf_counter()
    paths = [str(ds.paths[i]) for i in ex.ok]
    labels = ds.labels[ex.ok]
    suspects = find_suspects([ds.paths[i] for i in ex.ok], labels.tolist(), ds.classes,
                             [ex.digests[i] for i in ex.ok], threads=default_threads())
    found = find_label_errors(ex.features.numpy(), labels, ds.classes, paths, seed=seed)
    return CheckReport(
        data=str(data), backbone=model.identity(), classes=list(ds.classes), counts=ds.counts(),
        skipped_unreadable=ex.errors, suspect_images=suspects, label_errors=found.suspects,
        duplicates_across_classes=found.duplicates, label_check_agreement=round(found.agreement, 4),
        excluded=excluded, exclude_unmatched=unmatched,
        backbone_passes=ex.computed, from_cache=ex.cached,
        seconds={"features": t2 - t1, "label_errors": found.seconds, "total": time.perf_counter() - t0})
