"""Named training recipes: ``frozen`` (cached features, head only), ``frozen-aug`` (cached augmented views,
head only) and ``finetune`` (head first, then the last layer groups on activations cached at the boundary).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backbones.concat import ConcatBackbone, is_concatenation, member_names
from ..backbones.weights import state_digest
from ..data.augment import AugmentedView, preset
from ..config import STRATEGIES, Recipe, TrainConfig
from ..distributed import SINGLE, Distributed
from ..errors import ConfigError, DatasetError
from ..engines import LazyRunner, lazy_runner
from ..hardware import Hardware
from ..features import extract_features
from ..heads import Head
from .finetune import finetune_param_groups, split_backbone
from .head import class_weights, fit_head
from .loop import run_loop
from .lr_find import LrFind, range_test
from .select import can_select, select_head
from .spread import spread_extraction
from .steps import check_batch

__all__ = ["Recipe", "STRATEGIES", "TrainResult", "train_recipe", "check_concatenation", "feature_pool", "find_lr", "FALLBACK_LR"]

log = logging.getLogger("headstart")

FALLBACK_LR = 1e-4  # fine-tuning's rate when the range test finds no descent (a flat or broken curve)


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
    seconds: dict = dataclasses.field(default_factory=dict)  # "extraction" (every split and view), "training"
    selection: dict | None = None       # how the head was chosen (``select.select_head``), if it was
    lr_find: dict | None = None         # the range test that set the fine-tuning rate, if one did
    train_features: torch.Tensor | None = None  # train's eval view through the frozen top, when fine-tuned
    train_ok: list[int] | None = None   # the images of ``train_features``


def _extract(source, paths, cache, transform=None, progress=None, desc="", runner=None, pool=None):
    t0 = time.perf_counter()
    ex = extract_features(source, paths, cache, transform=transform, progress=progress, desc=desc, runner=runner,
                          pool=pool)
    log.info("%s: %d images, %d through the backbone, %d from the cache (%.1f s)", desc, len(paths), ex.computed,
             ex.cached, time.perf_counter() - t0)
    return ex


def _views(source, train, recipe, cache, seed, progress, runner, pool):
    """The eval view plus ``recipe.views`` augmented views of the training images, aligned on the images read
    in every view (a file that changed or vanished between two views is left out of all of them)."""
    base = _extract(source, train.paths, cache, progress=progress, desc="train features", runner=runner, pool=pool)
    extractions = [base]
    for v, view in enumerate(_augmented(source, recipe, seed)):
        extractions.append(_extract(source, train.paths, cache, view, progress, f"train view {v + 1}/{recipe.views}",
                                    runner, pool))
    ok = sorted(set.intersection(*(set(ex.ok) for ex in extractions)))
    tensors = [_rows(ex, ok) for ex in extractions]
    passes, cached = sum(ex.computed for ex in extractions), sum(ex.cached for ex in extractions)
    return tensors, ok, base, passes, cached


def _augmented(source, recipe, seed) -> list[AugmentedView]:
    """The augmented views of the training images that ``recipe`` trains on (none for ``frozen``)."""
    aug = preset(recipe.augmentation)
    if aug is None or recipe.strategy == "frozen":
        return []
    if isinstance(source, ConcatBackbone):  # each member's own view of the same draw
        return [[AugmentedView(m.data_config, aug, v, seed) for m in source.members] for v in range(recipe.views)]
    return [AugmentedView(source.data_config, aug, v, seed) for v in range(recipe.views)]


def _rows(ex, ok: list[int]) -> torch.Tensor:
    if ex.ok == ok:
        return ex.features
    where = {i: j for j, i in enumerate(ex.ok)}
    return ex.features[[where[i] for i in ok]]


def train_recipe(recipe: Recipe, backbone, splits, head: Head, config: TrainConfig, cache, *,
                 checkpoint_dir: Path | None = None, resume: bool = False, progress=None,
                 engine: str = "auto", hardware: Hardware | None = None,
                 dist: Distributed = SINGLE) -> TrainResult | None:
    """Run ``recipe``; the backbone (fine-tuned in place for ``finetune``) and ``head`` end trained.
    ``engine`` runs the frozen part (see ``headstart.engines``); one runner serves every view and split.
    ``hardware`` (default: the CPU) is where the engine and the training run.

    Under a process group (``dist``), the ranks first spread the extraction of every split and view between them
    (``spread.spread_extraction``); a frozen head then trains on rank 0 alone, from the cache, exactly as one
    process would, and the other ranks return None; fine-tuning runs on every rank (``loop.Trainer``)."""
    hardware = hardware or Hardware()
    t_start = time.perf_counter()
    check_concatenation(backbone.name, recipe.strategy, head.config.pool)  # sizes and weights: create_backbone
    source, upper = backbone, None
    if recipe.strategy == "finetune":
        source, upper = split_backbone(backbone, recipe.unfreeze or backbone.entry.finetune_groups)
        log.info("fine-tuning %s; cached activations at the boundary %s", ", ".join(upper.names),
                 "x".join(map(str, source.feature_shape)))
    runner = lazy_runner(source, engine, cache=cache, hardware=hardware)
    pool = feature_pool(recipe, head)
    spread = None
    if dist.active:
        if upper is not None:  # fails now, not after the extraction
            check_batch(config.batch_size, dist)
        spread = _spread(dist, source, splits, recipe, cache, config.seed, progress, runner, pool)
        if not dist.primary and upper is None:
            return None
    views, ok, base, passes, cached = _views(source, splits.train, recipe, cache, config.seed, progress, runner, pool)
    y_tr = splits.train.labels[ok]
    _check_classes_readable(splits.train.classes, y_tr, len(base.errors))
    val = None
    if splits.val is not None and len(splits.val):
        val = _extract(source, splits.val.paths, cache, progress=progress, desc="val features", runner=runner,
                       pool=pool)
    y_va = splits.val.labels[val.ok] if val is not None else None
    if y_va is not None:
        _warn_unmeasured_classes(splits.train.classes, y_tr, y_va)
    t_trained = time.perf_counter()
    top = _Top(upper)
    selection = None
    # fine-tuning starts from the head a frozen run would choose, so it never begins below the frozen model
    if (recipe.strategy in ("frozen", "finetune") and config.head_search == "auto"
            and can_select(y_tr, len(val.ok) if val else 0)):
        head, history, selection = select_head(head, top(views[0]), y_tr, top(val.features) if val else None, y_va,
                                               config, device=hardware.device)
        log.info("head chosen by %s: %s", selection["method"], selection["chosen"]["name"])
    else:
        history = fit_head(head, [top(v) for v in views], y_tr, top(val.features) if val else None, y_va, config,
                           progress=progress, device=hardware.device)
    for row in history:
        row["stage"] = "head"
    found = None
    # label errors are looked for in the features before fine-tuning: a top fitted to train's labels would hide them
    label_features = _as_extracted(top(views[0]), head) if upper is not None else None
    tried = None
    if upper is not None:
        rates = [recipe.finetune_lr]
        if recipe.finetune_lr is None:  # an explicit --finetune-lr wins; else the range test on the trained head
            found = _range_test(recipe, config, upper, head, views, y_tr, hardware.device)
            suggestion = found.suggestion if np.isfinite(found.suggestion) else FALLBACK_LR
            count = recipe.finetune_rates if val is not None and len(val.ok) else 1  # nothing to choose by
            rates = finetune_rates(suggestion, found.edge, count)
            log.info("learning-rate range test: suggestion %.2e (steepest %.2e, minimum/10 %.2e, loss at twice "
                     "its minimum after %.2e); fine-tuning at %s", found.suggestion, found.steepest, found.valley,
                     found.edge, ", ".join(f"{r:.2e}" for r in rates))
        stage2, lr, tried = _finetune_at(rates, recipe, config, upper, head, views, y_tr, val, y_va, history,
                                         checkpoint_dir, resume, progress, hardware, dist)
        if any(row["best"] for row in stage2):  # the saved weights are one epoch's, across both stages
            for row in history:
                row["best"] = False
        history += stage2
        backbone.freeze().eval()
        # new weights, new identity: cached features and exported graphs of the old ones must not be reused
        backbone.weights_digest = state_digest(backbone.body.state_dict())
    errors = base.errors + (val.errors if val else [])
    val_counts = (val.computed, val.cached) if val else (0, 0)
    if spread is not None:  # what went through the backbone on every rank, not this rank's reads of the cache
        (passes, cached), val_counts = spread["train"], spread.get("val", (0, 0))
    seconds = {"extraction": t_trained - t_start, "training": time.perf_counter() - t_trained}
    return TrainResult(head, history, top(val.features) if val is not None else None, val.ok if val else [], errors,
                       base, val, {"train": passes, "val": val_counts[0]}, {"train": cached, "val": val_counts[1]},
                       seconds, selection,
                       found.to_dict() | {"used": lr, "tried": tried} if found is not None else None,
                       label_features, ok if upper is not None else None)


def _as_extracted(fmap: torch.Tensor, head: Head) -> torch.Tensor:
    """Backbone maps as a frozen run's extraction keeps them for ``head`` (averaged when it only reads the
    average), so a fine-tuned run's label-error check reads the same kind of features as a frozen run's."""
    return fmap.mean(dim=(2, 3)) if fmap.ndim == 4 and head.feature_pool == "avg" else fmap


def check_concatenation(backbone: str, strategy: str, pool: str | None, input_size=None,
                        weights="imagenet") -> None:
    """Refuse what a concatenation (``a+b``) cannot train: fine-tuning, a flattening head, one input size or one
    weights file for all its members.

    Raises:
        ConfigError: an empty member (``a+``), or one of those for a concatenated ``backbone``.
    """
    if not is_concatenation(backbone):
        return
    first = member_names(backbone)[0]
    if strategy == "finetune":
        raise ConfigError(f"--strategy finetune trains one backbone's top layers, and {backbone!r} concatenates "
                          "several: a concatenation trains its head on frozen features. Use --strategy frozen (or "
                          f"frozen-aug), or fine-tune one member: --backbone {first} --strategy finetune")
    if pool == "flatten":
        raise ConfigError(f"--head flatten keeps each feature map whole, and {backbone!r} joins the members' pooled "
                          "features; use --head avg (a concatenation's default)")
    if input_size is not None:
        raise ConfigError(f"each member of {backbone!r} reads images at its own size; leave --input-size out")
    if weights is not None and str(weights) != "imagenet":
        raise ConfigError(f"--weights {weights} names one backbone's weights, and {backbone!r} concatenates "
                          "several: each member takes its own ImageNet weights. Leave --weights out (or use "
                          "--random-init)")


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


def _warn_unmeasured_classes(classes: list[str], y_tr: np.ndarray, y_va: np.ndarray) -> None:
    """Warn about trained classes with no readable validation image: validation cannot measure them, and the
    best epoch is chosen without them."""
    missing = sorted(set(y_tr.tolist()) - set(y_va.tolist()))
    if missing:
        log.warning("class(es) %s have no readable validation image: their accuracy is not measured and the best "
                    "epoch is chosen without them; add validation images of them (or let --val-fraction split them)",
                    [classes[i] for i in missing])


def _check_classes_readable(classes: list[str], labels: np.ndarray, n_errors: int) -> None:
    counts = np.bincount(labels, minlength=len(classes))
    if (counts == 0).any():
        empty = [c for c, n in zip(classes, counts) if n == 0]
        raise DatasetError(f"class(es) {empty} have no readable training image after skipping "
                           f"{n_errors} unreadable file(s); add readable images.")


class _Top:
    """Boundary activations -> backbone features through the fine-tuned top (identity when frozen)."""

    def __init__(self, upper):
        self.upper = upper

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.upper is None:
            return x
        self.upper.eval()
        with torch.no_grad():
            return torch.cat([self.upper(x[i:i + 64]) for i in range(0, len(x), 64)]) if len(x) else x


def _range_groups(recipe, config, upper, head, lr: float) -> list[dict]:
    return finetune_param_groups(upper, head, lr, lr * recipe.head_lr_factor, recipe.lr_decay,
                                 weight_decay=recipe.finetune_weight_decay, head_weight_decay=config.weight_decay)


def _range_test(recipe, config, upper, head, views, y_tr, device) -> LrFind:
    """The range test on the fine-tuned part (the upper groups and the trained head), its rates in the ratios
    fine-tuning gives them; the weights are left as they were."""
    model = nn.Sequential(upper, head)
    weight = class_weights(y_tr, head.num_classes) if config.class_weight else None
    return range_test(model, _range_groups(recipe, config, upper, head, 1.0), views, torch.as_tensor(y_tr),
                      batch_size=config.batch_size, weight=weight, seed=config.seed, device=device)


def find_lr(recipe: Recipe, backbone, splits, head: Head, config: TrainConfig, cache, *, progress=None,
            engine: str = "auto", hardware: Hardware | None = None) -> LrFind:
    """``headstart lr-find``: the head trained on cached boundary activations, then the range test over the
    groups ``finetune`` would train. The backbone is left frozen and unchanged."""
    hardware = hardware or Hardware()
    source, upper = split_backbone(backbone, recipe.unfreeze or backbone.entry.finetune_groups)
    runner = LazyRunner(source, engine, cache=cache, hardware=hardware)
    views, ok, base, _, _ = _views(source, splits.train, recipe, cache, config.seed, progress, runner, None)
    y_tr = splits.train.labels[ok]
    _check_classes_readable(splits.train.classes, y_tr, len(base.errors))
    top = _Top(upper)
    fit_head(head, [top(v) for v in views], y_tr, None, None, config, progress=progress, device=hardware.device)
    try:
        return _range_test(recipe, config, upper, head, views, y_tr, hardware.device)
    finally:
        backbone.freeze().eval()


def keeps_finetuned(head_accuracy: float | None, stage2: list[dict]) -> bool:
    """Whether fine-tuning's best epoch (by val loss, as ``run_loop`` keeps it) replaces the head stage: it must
    also be at least as accurate on validation. Without validation the monitored loss decides alone."""
    best = [r for r in stage2 if r.get("best")]
    if not best:
        return False
    # 1e-6: the same count of right images, whichever precision each share was computed in
    return head_accuracy is None or best[0].get("val_accuracy", head_accuracy) >= head_accuracy - 1e-6


def finetune_rates(suggestion: float, edge: float, count: int) -> list[float]:
    """The rates fine-tuning tries: ``count`` of them evenly spaced (in log) from the range test's suggestion up
    to the last rate before its loss passes twice its minimum (``edge``; ten times the suggestion when that is not
    above it). Up, because the test runs after the head has fitted train: its curve is flat, the suggestion is
    cautious, and where the loss climbs is the one clear mark on such a curve."""
    if count == 1:
        return [suggestion]
    top = edge if np.isfinite(edge) and edge > suggestion else 10 * suggestion
    return [float(r) for r in np.geomspace(suggestion, top, count)]


def _finetune_at(rates, recipe, config, upper, head, views, y_tr, val, y_va, history, checkpoint_dir, resume,
                 progress, hardware, dist) -> tuple[list[dict], float, list[dict] | None]:
    """Fine-tune from the head stage at each rate and keep the run best on validation (accuracy, then loss); a run
    that does not replace the head stage scores as the head stage. Returns its history, its rate and, when more
    than one rate was tried, what each reached. Each rate has its own checkpoint, so a resumed run continues the
    rate it was at and replays the finished ones from theirs."""
    if len(rates) == 1:
        return _finetune(recipe, config, upper, head, views, y_tr, val, y_va, history, checkpoint_dir, resume,
                         progress, hardware, dist, lr=rates[0]), rates[0], None
    model = nn.Sequential(upper, head)
    start = _snapshot(model)
    best, tried, runs = None, [], []
    for i, lr in enumerate(rates):
        model.load_state_dict(start)
        stage2 = _finetune(recipe, config, upper, head, views, y_tr, val, y_va, history, checkpoint_dir, resume,
                           progress, hardware, dist, lr=lr, checkpoint_name=_checkpoint_name(i))
        row = next((r for r in stage2 if r["best"]), None)
        score = (row["val_accuracy"], -row["val_loss"]) if row else None
        runs.append(stage2)
        tried.append({"lr": lr, "epochs": len(stage2), "replaced_head": row is not None,
                      "val_accuracy": row and row["val_accuracy"], "val_loss": row and row["val_loss"]})
        log.info("fine-tuning at %.2e: %s", lr, f"val accuracy {row['val_accuracy']:.4f}, val loss "
                 f"{row['val_loss']:.4f} (epoch {row['epoch']})" if row else "did not beat the head stage")
        if score is not None and (best is None or score > best[0]):
            best = (score, lr, stage2, _snapshot(model))
    if best is None:  # no rate beat the head stage: its weights, and the first rate's epochs for the record
        model.load_state_dict(start)
        return runs[0], rates[0], tried
    model.load_state_dict(best[3])
    return best[2], best[1], tried


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _checkpoint_name(i: int) -> str:
    return "finetune.safetensors" if i == 0 else f"finetune-{i + 1}.safetensors"


def _finetune(recipe, config, upper, head, views, y_tr, val, y_va, history, checkpoint_dir, resume, progress,
              hardware, dist: Distributed = SINGLE, lr: float | None = None,
              checkpoint_name: str = "finetune.safetensors") -> list[dict]:
    """The second stage: the unfrozen top and the head together, from the head stage's best weights (an epoch
    must beat the head stage's best monitored loss, and be as accurate on validation, to replace them)."""
    model = nn.Sequential(upper, head)
    groups = _range_groups(recipe, config, upper, head, lr or recipe.finetune_lr or FALLBACK_LR)
    loop = dataclasses.replace(config, epochs=recipe.finetune_epochs, patience=recipe.finetune_patience(),
                               warmup_epochs=recipe.finetune_warmup_epochs, cosine=True,
                               clip_grad=config.clip_grad or recipe.finetune_clip_grad)
    weight = class_weights(y_tr, head.num_classes) if config.class_weight else None
    ckpt = checkpoint_dir / checkpoint_name if checkpoint_dir else None
    yv = torch.as_tensor(y_va) if val is not None else None
    # the head stage's best row: the weights fine-tuning starts from, and the figures it must beat (a head refitted
    # on all of train after cross-validation has its validation scores on that row alone)
    key = "val_loss" if val is not None else "train_loss"
    head_row = next((r for r in history if r.get("best") and key in r), None) or min(
        (r for r in history if key in r), key=lambda r: r[key])
    best_head = head_row[key]
    head_accuracy = head_row.get("val_accuracy") if val is not None else None
    head_state = _snapshot(model)
    stage2 = run_loop(model, groups, views, torch.as_tensor(y_tr), val.features if val else None, yv, loop,
                      class_weight=weight, checkpoint=ckpt, resume=resume, progress=progress,
                      desc="fine-tune", baseline=best_head, device=hardware.device, dist=dist)
    model.to("cpu")
    if any(r["best"] for r in stage2) and not keeps_finetuned(head_accuracy, stage2):
        # a lower val loss is not enough: the saved model is never less accurate on validation than the head
        best = next(r for r in stage2 if r["best"])
        log.info("fine-tuning's best epoch by val loss has val accuracy %.4f, below the head stage's %.4f: the "
                 "head stage's weights are kept", best["val_accuracy"], head_accuracy)
        model.load_state_dict(head_state)
        for row in stage2:
            row["best"] = False
    for row in stage2:
        row["stage"] = "finetune"
        row["epoch"] += len(history)
    return stage2
