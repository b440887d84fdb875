"""Named training recipes: ``frozen`` (cached features, head only), ``frozen-aug`` (cached augmented views,
head only) and ``finetune`` (head first, then the last layer groups on activations cached at the boundary).
"""

from __future__ import annotations

import logging
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backbones.weights import state_digest
from ..data.augment import AugmentedView, preset
from ..config import STRATEGIES, Recipe, TrainConfig
from ..distributed import SINGLE, Distributed
from ..errors import DatasetError
from ..engines import LazyRunner
from ..features import extract_features
from ..heads import Head
from .finetune import finetune_param_groups, split_backbone
from .head import class_weights, fit_head
from .loop import run_loop
from .spread import spread_extraction

__all__ = ["Recipe", "STRATEGIES", "TrainResult", "train_recipe", "feature_pool"]

log = logging.getLogger("headstart")


def feature_pool(recipe: Recipe, head: Head) -> str | None:
    """What extraction keeps (and caches) for ``head``: its pooling (``Head.feature_pool``), or whole maps when
    fine-tuning, which trains on the boundary's maps."""
    return None if recipe.strategy == "finetune" else head.feature_pool


@dataclass
class TrainResult:
    head: Head
    history: list[dict]
    val_features: torch.Tensor | None   # from the final backbone, for metrics
    val_ok: list[int]
    errors: list[tuple[str, str]]       # unreadable files, train and val
    train_extraction: object            # the eval-view Extraction of train (digests, recomputed entries)
    val_extraction: object | None
    passes: dict                        # images through the (lower) backbone, per split
    cached: dict


def _extract(source, paths, cache, transform=None, progress=None, desc="", runner=None, pool=None):
    t0 = time.perf_counter()
    ex = extract_features(source, paths, cache, transform=transform, progress=progress, desc=desc, runner=runner,
                          pool=pool)
    log.info("%s: %d images, %d through the backbone, %d from the cache (%.1f s)", desc, len(paths), ex.computed,
             ex.cached, time.perf_counter() - t0)
    return ex


def _augmented(source, recipe, seed) -> list[AugmentedView]:
    """The augmented views of the training images that ``recipe`` trains on (none for ``frozen``)."""
    aug = preset(recipe.augmentation)
    if aug is None or recipe.strategy == "frozen":
        return []
    return [AugmentedView(source.data_config, aug, v, seed) for v in range(recipe.views)]


def _views(source, train, recipe, cache, seed, progress, runner, pool):
    """The eval view plus ``recipe.views`` augmented views of the training images, aligned on readable files."""
    base = _extract(source, train.paths, cache, progress=progress, desc="train features", runner=runner, pool=pool)
    views, passes, cached = [base], base.computed, base.cached
    for v, view in enumerate(_augmented(source, recipe, seed)):
        ex = _extract(source, train.paths, cache, view, progress, f"train view {v + 1}/{recipe.views}", runner, pool)
        views.append(ex)
        passes, cached = passes + ex.computed, cached + ex.cached
    ok = base.ok
    tensors = [base.features] + [v.features for v in views[1:]]  # a file readable once is readable in every view
    return tensors, ok, base, passes, cached


def train_recipe(recipe: Recipe, backbone, splits, head: Head, config: TrainConfig, cache, *,
                 checkpoint_dir: Path | None = None, resume: bool = False, progress=None,
                 engine: str = "auto", dist: Distributed = SINGLE) -> TrainResult | None:
    """Run ``recipe``; the backbone (fine-tuned in place for ``finetune``) and ``head`` end trained.
    ``engine`` runs the frozen part (see ``headstart.engines``); one runner serves every view and split.

    Under a process group (``dist``), the ranks first spread the extraction of every split and view between them
    (``spread.spread_extraction``); a frozen head then trains on rank 0 alone, from the cache, exactly as one
    process would, and the other ranks return None; fine-tuning runs on every rank (``loop.run_loop``)."""
    source = backbone
    upper = None
    if recipe.strategy == "finetune":
        unfreeze = recipe.unfreeze or backbone.entry.finetune_groups
        source, upper = split_backbone(backbone, unfreeze)
        log.info("fine-tuning %s; cached activations at the boundary %s", ", ".join(upper.names),
                 "x".join(map(str, source.feature_shape)))
    runner = LazyRunner(source, engine, cache=cache)
    pool = feature_pool(recipe, head)
    spread = None
    if dist.active:
        spread = _spread(dist, source, splits, recipe, cache, config.seed, progress, runner, pool)
        if not dist.primary and upper is None:
            return None
    views, ok, base, passes, cached = _views(source, splits.train, recipe, cache, config.seed, progress, runner, pool)
    y_tr = splits.train.labels[ok]
    counts = np.bincount(y_tr, minlength=len(splits.train.classes))
    if (counts == 0).any():
        empty = [c for c, n in zip(splits.train.classes, counts) if n == 0]
        raise DatasetError(f"class(es) {empty} have no readable training image after skipping "
                           f"{len(base.errors)} unreadable file(s); add readable images.")
    val = None
    if splits.val is not None and len(splits.val):
        val = _extract(source, splits.val.paths, cache, progress=progress, desc="val features", runner=runner,
                       pool=pool)
    y_va = splits.val.labels[val.ok] if val is not None else None

    def top(x):  # boundary activations -> backbone features, in chunks
        if upper is None:
            return x
        upper.eval()
        with torch.no_grad():
            return torch.cat([upper(x[i:i + 64]) for i in range(0, len(x), 64)]) if len(x) else x

    history = fit_head(head, [top(v) for v in views], y_tr, top(val.features) if val else None, y_va, config,
                       progress=progress)
    for row in history:
        row["stage"] = "head"
    if upper is not None:
        model = nn.Sequential(upper, head)
        groups = finetune_param_groups(upper, head, recipe.finetune_lr, recipe.finetune_lr * recipe.head_lr_factor,
                                       recipe.lr_decay, weight_decay=recipe.finetune_weight_decay,
                                       head_weight_decay=config.weight_decay)
        loop = dataclasses.replace(config, epochs=recipe.finetune_epochs, patience=recipe.finetune_patience(),
                                   warmup_epochs=recipe.finetune_warmup_epochs, cosine=True,
                                   clip_grad=config.clip_grad or recipe.finetune_clip_grad)
        weight = class_weights(y_tr, head.num_classes) if config.class_weight else None
        ckpt = checkpoint_dir / "finetune.safetensors" if checkpoint_dir else None
        yv = torch.as_tensor(y_va) if val is not None else None
        best_head = min(r["val_loss"] if val else r["train_loss"] for r in history)
        stage2 = run_loop(model, groups, views, torch.as_tensor(y_tr), val.features if val else None, yv, loop,
                          class_weight=weight, checkpoint=ckpt, resume=resume, progress=progress,
                          desc="fine-tune", baseline=best_head, dist=dist)
        for row in stage2:
            row["stage"] = "finetune"
            row["epoch"] += len(history)
        history += stage2
        backbone.freeze().eval()
        # new weights, new identity: cached features and exported graphs of the old ones must not be reused
        backbone.weights_digest = state_digest(backbone.body.state_dict())
    val_features = top(val.features) if val is not None else None
    errors = base.errors + (val.errors if val else [])
    if spread is not None:  # what went through the backbone on every rank, not this rank's reads of the cache
        passes, cached = spread["train"]
        val_counts = spread.get("val", (0, 0))
    else:
        val_counts = (val.computed, val.cached) if val else (0, 0)
    return TrainResult(head, history, val_features, val.ok if val else [], errors, base, val,
                       {"train": passes, "val": val_counts[0]}, {"train": cached, "val": val_counts[1]})


def _spread(dist, source, splits, recipe, cache, seed, progress, runner, pool) -> dict[str, tuple[int, int]]:
    """Every extraction this training makes, spread over the ranks; ``{split: (passes, hits)}`` summed over them.
    The test split is included when it is read through the same frozen backbone (not after fine-tuning)."""
    jobs = [("train", splits.train.paths, None)]
    jobs += [("train", splits.train.paths, view) for view in _augmented(source, recipe, seed)]
    for name in ("val", "test"):
        ds = getattr(splits, name)
        if ds is not None and len(ds) and not (name == "test" and recipe.strategy == "finetune"):
            jobs.append((name, ds.paths, None))
    counts = spread_extraction(dist, source, [(images, view) for _, images, view in jobs], cache, runner=runner,
                               pool=pool, progress=progress)
    totals: dict[str, tuple[int, int]] = {}
    for (name, _, _), (c, h) in zip(jobs, counts):
        was = totals.get(name, (0, 0))
        totals[name] = (was[0] + c, was[1] + h)
    return totals
