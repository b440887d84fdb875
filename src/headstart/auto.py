"""``headstart train DATA --auto``: candidates tried in order of cost within a time budget, the best kept.

    >>> clf, board = auto_fit(splits, AutoConfig(auto=True, time_budget="5m"), cache=True)
    >>> board[0]["candidate"], board[0]["score"], board[0]["seconds"]

A candidate is a backbone whose weights are available offline (efficientnet_lite0/1/2 from their packages, in
that order of cost, and the one given with ``--backbone``/``--weights``), with the head chosen for it by
``training.select`` (cross-validation on train below 500 validation images, else the validation set). Each is
scored by that same choice's score, so the candidates compete on one footing and the validation set stays held
out when it is small. Before a candidate starts, its cost is estimated (the images its cache lacks times the
time of one forward pass of its backbone, measured, plus the last head selection's time); one that would end
past the budget is skipped and listed as such. The first candidate always runs, so there is a model to save.

Then two more, under the same rule: the concatenation of the two best backbones (``a+b``, see
``backbones.concat``; its head selection estimated from theirs, scaled by its width), scored like them; and the
best backbone fine-tuned (``--strategy finetune``), estimated from its boundary activations still to compute and
one timed training step, scored on validation and kept only when it beats the best there (with one augmented
view instead of ``views``, then also one learning rate instead of ``finetune_rates``, when only that fits in
what is left). Last, when time is left, the same backbone fine-tuned twice as deep (``deeper_unfreeze``: twice
its layer groups, the stem kept frozen), under the same rule: on photos like ImageNet's the top groups suffice
and it is not kept; on data far from them (digits, tiles, scans) the earlier groups are where it can gain.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time

import torch

from .api import ImageClassifier
from .backbones import registry
from .backbones.base import create_backbone
from .backbones.concat import SEPARATOR, is_concatenation, member_names
from .config import AutoConfig, Recipe
from .data.datasets import Splits
from .errors import ConfigError, HeadstartError
from .features import FeatureCache, cache_key, file_digest
from .training.finetune import split_backbone

__all__ = ["AutoConfig", "auto_fit", "auto_candidates", "deeper_unfreeze", "OFFLINE_FAMILY", "format_leaderboard"]

log = logging.getLogger("headstart")

OFFLINE_FAMILY = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")  # in order of cost
_SAVE_RESERVE = 0.03  # of the budget, kept for saving the run after the last candidate


def auto_candidates(backbone: str, weights) -> list[tuple[str, object]]:
    """``(backbone, weights)`` to try: the given backbone first when it is not one of the offline family (the
    user asked for it: it always runs), then the family whose weights are here, cheapest first."""
    out = [(name, "imagenet") for name in OFFLINE_FAMILY if any(s.available() for s in registry.get(name).sources)]
    given = (backbone, weights)
    if given not in out and weights is not None:
        out.insert(0, given)
    return out


def auto_fit(splits: Splits, auto: AutoConfig, params: dict, *, cache=True,
             candidates: list[tuple[str, object]] | None = None) -> tuple[ImageClassifier, list[dict]]:
    """Train every affordable candidate on ``splits`` with ``params`` (``ImageClassifier`` arguments; backbone and
    weights are the candidate's); returns the best classifier and the leaderboard (the saved model first, then
    the other trained candidates by score, then those skipped). ``candidates``: ``(backbone, weights)`` pairs
    instead of ``auto_candidates``.

    After the backbones alone: the concatenation of the best two (``a+b``, frozen, its head chosen the same way,
    so scored on the same footing), then fine-tuning of the best single backbone (``strategy="finetune"``, the
    learning rate from the range test unless ``params`` give one). Fine-tuning is not cross-validated: it is
    scored on the validation set and replaces the best model only when its validation accuracy is higher.

    Raises:
        ConfigError: no candidate has its weights here, or none could be trained with ``params``.
    """
    search = _Search(splits, auto, params, cache)
    candidates = candidates or auto_candidates(params.get("backbone", "efficientnet_lite0"),
                                               params.get("weights", "imagenet"))
    if not candidates:
        raise ConfigError("--auto found no backbone with weights available offline; give --weights FILE")
    for name, weights in candidates:
        search.frozen(name, weights)
    singles = sorted((r for r in search.board if r["status"] == "trained" and not is_concatenation(r["backbone"])),
                     key=lambda r: -r["score"])  # a --backbone a+b given is a candidate, not a member
    pair = []
    for r in singles:  # the best two backbones with their own weights (a concatenation takes no weights file)
        if r["weights"] == "imagenet" and all(r["backbone"] != p["backbone"] for p in pair):
            pair.append(r)
    if len(pair) >= 2:
        pair = pair[:2]
        search.frozen(SEPARATOR.join(r["backbone"] for r in pair), "imagenet",
                      select_scale=sum(r["width"] for r in pair) / min(r["width"] for r in pair),
                      select_seconds=max(r["select_seconds"] for r in pair))
    if singles:
        name, weights = singles[0]["backbone"], singles[0]["weights"]
        search.finetuned(name, weights)
        deeper = deeper_unfreeze(name, weights, params)
        if deeper is not None:
            search.finetuned(name, weights, unfreeze=deeper)
    return search.result()


def deeper_unfreeze(name: str, weights, params: dict) -> int | None:
    """The layer groups of the deeper fine-tuning candidate: twice what ``finetune`` unfreezes for these settings
    (``--unfreeze`` or the backbone's own), short of the stem; None when that is no deeper."""
    bb = create_backbone(name, weights, params.get("input_size"))
    base = params.get("unfreeze") or bb.entry.finetune_groups
    deeper = min(2 * base, len(bb.layer_groups()) - 1)
    return deeper if deeper > base else None


class _Search:
    """The candidates tried so far: the leaderboard, the best classifier, and the clock against the budget."""

    def __init__(self, splits, auto, params, cache):
        self.t0 = time.perf_counter()
        self.budget = auto.seconds()
        self.splits, self.params, self.cache = splits, params, cache
        self.feature_cache = FeatureCache.default() if cache is True else FeatureCache(cache) if cache else None
        paths = list(splits.train.paths) + (list(splits.val.paths) if splits.val is not None else [])
        self.digests = _digests(paths)
        self.board: list[dict] = []
        self.best: tuple[ImageClassifier, dict] | None = None
        self.last_select = 0.0

    def _left(self) -> float:
        return self.budget * (1 - _SAVE_RESERVE) - (time.perf_counter() - self.t0)

    def _affordable(self, label: str, estimate_of) -> float | None:
        """The candidate's estimate when it fits in what is left (the first always does); else a skipped row."""
        t = time.perf_counter()
        if self.best is not None and self._left() <= 0:
            self.board.append({"candidate": label, "status": "skipped: no time left", "seconds": 0.0})
            return None
        try:
            estimate = estimate_of()
        except HeadstartError as exc:
            self.board.append({"candidate": label, "status": f"skipped: {exc}", "seconds": 0.0})
            return None
        left = self._left()
        if self.best is not None and estimate > left:
            self.board.append({"candidate": label, "status": f"skipped: estimated {estimate:.0f} s, {max(left, 0):.0f} "
                               "s left", "estimate": estimate, "seconds": time.perf_counter() - t})
            log.info("auto: %s skipped (estimated %.0f s, %.0f s left)", label, estimate, left)
            return None
        return estimate

    def _fits(self, estimate_of) -> float | None:
        """The estimate when it fits in what is left, else None (nothing recorded: the caller has a cheaper
        variant to try)."""
        try:
            estimate = estimate_of()
        except HeadstartError:
            return None
        return estimate if self.best is None or estimate <= self._left() else None

    def frozen(self, name: str, weights, select_scale: float = 1.0, select_seconds: float | None = None) -> None:
        """A backbone (or a concatenation) with its head chosen by ``training.select``."""
        label = name if weights in ("imagenet", None) else f"{name} ({weights})"
        t = time.perf_counter()
        select = (self.last_select if select_seconds is None else select_seconds) * select_scale
        estimate = self._affordable(label, lambda: sum(_estimate(m, weights, self.params, self.feature_cache,
                                                                 self.digests) for m in _members(name)) + select)
        if estimate is None:
            return
        clf = self._classifier(label, name=name, weights=weights, strategy="frozen", head_search="auto")
        if clf is None:
            return
        clf.fit(self.splits)
        sel = clf.report_.head_selection or {}
        chosen = sel.get("chosen", {})
        val = clf.metrics_.get("val", {}).get("accuracy")
        self.last_select = sel.get("seconds", 0.0)
        row = {"candidate": label, "head": chosen.get("name", "as configured"),
               "score": chosen.get("accuracy", val if val is not None else float("nan")),
               "scored_by": sel.get("method", "validation"), "val_accuracy": val, "estimate": estimate,
               "seconds": time.perf_counter() - t, "status": "trained",
               # what the concatenation and fine-tuning candidates are built from (dropped from the saved board)
               "backbone": name, "weights": weights, "width": clf.model_.backbone.num_features,
               "select_seconds": self.last_select}
        self._add(clf, row, row["score"] > self.best[1]["score"] + 1e-9 if self.best else True)

    def finetuned(self, name: str, weights, unfreeze: int | None = None) -> None:
        """The best backbone fine-tuned (``strategy="finetune"``, ``unfreeze`` layer groups when given); it must
        beat the best on validation."""
        label = (f"{name} fine-tuned" + ("" if unfreeze is None else f", {unfreeze} layer groups")
                 + ("" if weights in ("imagenet", None) else f" ({weights})"))
        settings = {} if unfreeze is None else {"unfreeze": unfreeze}
        t = time.perf_counter()

        def estimate_of(extra: dict):
            return lambda: _finetune_estimate(name, weights, self.params | settings | extra, self.splits,
                                              self.feature_cache, self.digests)

        as_given = functools.cache(estimate_of({}))  # estimated once, whether it runs or is skipped
        lowered = [v for v in _CHEAPER_FINETUNES if any(self.params.get(k, _RECIPE_DEFAULTS[k]) > n
                                                        for k, n in v.items())]
        for extra in [{}] + lowered:
            estimate = self._fits(as_given if not extra else estimate_of(extra))
            if estimate is not None:
                settings |= extra
                label += "".join(f", {n} {_VARIANT_WORDS[k]}" for k, n in extra.items())
                break
        else:
            estimate = self._affordable(label, as_given)  # skipped, with the reason
        if estimate is None:
            return
        clf = self._classifier(label, name=name, weights=weights, strategy="finetune", **settings)
        if clf is None:
            return
        clf.fit(self.splits)
        val = clf.metrics_.get("val", {}).get("accuracy")
        found = clf.report_.lr_find
        row = {"candidate": label, "head": "as configured, then the top layers",
               "score": val if val is not None else float("nan"), "scored_by": "validation",
               "val_accuracy": val, "estimate": estimate, "seconds": time.perf_counter() - t, "status": "trained",
               "finetune_lr": found["used"] if found else clf.finetune_lr,
               "unfreeze": clf.unfreeze or clf.model_.backbone.entry.finetune_groups, "views": clf.views,
               "rates": clf.finetune_rates,
               "backbone": name, "weights": weights}
        best_val = self.best[1].get("val_accuracy") if self.best else None
        self._add(clf, row, val is not None and (best_val is None or val > best_val + 1e-9))

    def _classifier(self, label: str, name: str, **settings) -> ImageClassifier | None:
        """The candidate's classifier; None (and a skipped row) when the settings given do not apply to it (a
        concatenation with --input-size or --head flatten)."""
        try:
            return ImageClassifier(**(self.params | {"backbone": name} | settings),
                                   cache=self.cache if self.cache else False)
        except ConfigError as exc:
            self.board.append({"candidate": label, "status": f"skipped: {exc}", "seconds": 0.0})
            return None

    def _add(self, clf, row: dict, better: bool) -> None:
        self.board.append(row)
        log.info("auto: %s scored %.4f (%s) in %.0f s", row["candidate"], row["score"], row["head"], row["seconds"])
        if better:
            self.best = (clf, row)

    def result(self) -> tuple[ImageClassifier, list[dict]]:
        if self.best is None:
            reasons = "; ".join(f"{r['candidate']}: {r['status']}" for r in self.board)
            raise ConfigError(f"--auto trained no candidate ({reasons})")
        clf, saved = self.best
        trained = sorted((r for r in self.board if r["status"] == "trained" and r is not saved),
                         key=lambda r: (-r["score"], r["seconds"]))
        board = [saved | {"saved": True}] + trained + [r for r in self.board if r["status"] != "trained"]
        board = [{k: v for k, v in r.items() if k not in _INTERNAL} for r in board]
        clf.report_.seconds["total"] = time.perf_counter() - self.t0
        clf.leaderboard_ = board
        return clf, board


_INTERNAL = ("backbone", "weights", "width", "select_seconds")
# A fine-tune that does not fit in the time left is estimated again with one augmented view (the views cost their
# extraction), then also with one rate (each rate is a whole fine-tune); a variant runs when it lowers a setting
_CHEAPER_FINETUNES = ({"views": 1}, {"views": 1, "finetune_rates": 1})
_RECIPE_DEFAULTS = {"views": Recipe().views, "finetune_rates": Recipe().finetune_rates}
_VARIANT_WORDS = {"views": "view", "finetune_rates": "rate"}


def _members(name: str) -> list[str]:
    return member_names(name) if is_concatenation(name) else [name]


def _digests(paths) -> list[str | None]:
    out = []
    for p in paths:
        try:
            out.append(file_digest(p))
        except HeadstartError:
            out.append(None)
    return out


def _missing(cache, digests, *keys) -> int:
    """How many of ``digests`` are in none of the cache namespaces of ``keys``."""
    if cache is None:
        return len(digests)
    have = set()
    for key in keys:
        have |= set(cache.index(FeatureCache.namespace(key), refresh=True))
    return sum(1 for d in digests if d is None or d not in have)


def _per_image(module, input_size) -> float:
    """Seconds of one forward pass per image, measured on a batch of two (after a first pass)."""
    x = torch.zeros(2, 3, *input_size)
    with torch.inference_mode():
        module(x)  # the first pass pays for allocation
        t = time.perf_counter()
        module(x)
    return (time.perf_counter() - t) / 2


def _estimate(name, weights, params, cache, digests) -> float:
    """Seconds a candidate should take: the images its cache lacks times one measured forward pass."""
    bb = create_backbone(name, weights, params.get("input_size")).freeze().eval()
    missing = _missing(cache, digests, cache_key(bb, pool="avg"), cache_key(bb))
    if not missing:
        return 0.0
    return missing * _per_image(bb, bb.data_config.input_size) * 1.2 + 3.0  # decoding, the engine's start


def _finetune_estimate(name, weights, params, splits, cache, digests) -> float:
    """Seconds fine-tuning should take: the boundary activations the cache lacks (every view of train, and val)
    times one measured pass of the lower part; then the range test's steps (unless a rate is given) and the
    fine-tuning epochs' steps (once per rate tried) times one measured training step of the top and a head,
    with a pass over val per epoch and the top run once over every view for the head stage."""
    recipe = Recipe(strategy="finetune", augment=params.get("augment"), views=params.get("views", 5),
                    unfreeze=params.get("unfreeze"), finetune_epochs=params.get("finetune_epochs", 15),
                    finetune_lr=params.get("finetune_lr"), finetune_rates=params.get("finetune_rates", 3))
    bb = create_backbone(name, weights, params.get("input_size")).freeze().eval()
    lower, upper = split_backbone(bb, recipe.unfreeze or bb.entry.finetune_groups)
    n_train, n_val = len(splits.train), len(splits.val) if splits.val is not None else 0
    views = 1 + (recipe.views if recipe.augmentation != "none" else 0)
    train_digests, val_digests = digests[:n_train], digests[n_train:]  # as ``_Search`` read them
    passes = (_missing(cache, train_digests, cache_key(lower)) * views + _missing(cache, val_digests,
                                                                                  cache_key(lower)))
    extraction = passes * _per_image(lower, bb.data_config.input_size) * 1.2 + (3.0 if passes else 0.0)
    batch = max(1, min(params.get("batch_size", 32), n_train))
    step = _step_seconds(upper, lower.feature_shape, bb.num_features, len(splits.train.classes), batch)
    per_epoch = math.ceil(n_train / batch) + math.ceil(n_val / batch) / 3  # a forward pass is about a third
    rates = recipe.finetune_rates if recipe.finetune_lr is None and n_val else 1  # each rate tried is a fine-tune
    steps = (100 if recipe.finetune_lr is None else 0) + rates * recipe.finetune_epochs * per_epoch
    top_once = (views * n_train + n_val) / batch / 3
    bb.freeze()
    return (extraction + (steps + top_once) * step) * 1.2 + 3.0


def _step_seconds(upper, boundary_shape, num_features, num_classes, batch) -> float:
    """One AdamW step (forward, backward, update) of ``upper`` and a linear head on ``batch`` activations, timed
    after a first one; the weights are put back."""
    head = torch.nn.Linear(num_features, num_classes)
    model = torch.nn.Sequential(upper, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), head)
    saved = copy.deepcopy(upper.state_dict())
    for p in upper.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x, y = torch.randn(batch, *boundary_shape), torch.zeros(batch, dtype=torch.long)
    model.train()
    try:
        seconds = []
        for _ in range(2):
            t = time.perf_counter()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            seconds.append(time.perf_counter() - t)
    finally:
        upper.load_state_dict(saved)
        for p in upper.parameters():
            p.requires_grad_(False)
        model.eval()
    return seconds[-1]


def format_leaderboard(board: list[dict]) -> list[str]:
    lines = [f"{'candidate':<32} {'head':<34} {'score':>7} {'val acc':>8} {'seconds':>8}  status"]
    for r in board:
        score = f"{r['score']:.4f}" if "score" in r else ""
        val = f"{r['val_accuracy']:.4f}" if r.get("val_accuracy") is not None else ""
        lines.append(f"{r['candidate']:<32} {r.get('head', ''):<34} {score:>7} {val:>8} {r['seconds']:>8.1f}  "
                     f"{r['status']}")
    return lines
