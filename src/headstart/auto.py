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
"""

from __future__ import annotations

import logging
import time

import torch

from .api import ImageClassifier
from .backbones import registry
from .backbones.base import create_backbone
from .config import AutoConfig
from .data.datasets import Splits
from .errors import ConfigError, HeadstartError
from .features import FeatureCache, cache_key, file_digest

__all__ = ["AutoConfig", "auto_fit", "auto_candidates", "OFFLINE_FAMILY", "format_leaderboard"]

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
    weights are the candidate's); returns the best classifier and the leaderboard (best first, then skipped).
    ``candidates``: ``(backbone, weights)`` pairs instead of ``auto_candidates``.

    Raises:
        ConfigError: no candidate has its weights here.
    """
    t0 = time.perf_counter()
    budget = auto.seconds()
    candidates = candidates or auto_candidates(params.get("backbone", "efficientnet_lite0"),
                                               params.get("weights", "imagenet"))
    if not candidates:
        raise ConfigError("--auto found no backbone with weights available offline; give --weights FILE")
    feature_cache = FeatureCache.default() if cache is True else FeatureCache(cache) if cache else None
    paths = list(splits.train.paths) + (list(splits.val.paths) if splits.val is not None else [])
    digests = _digests(paths)
    board, best, last_select = [], None, 0.0
    for i, (name, weights) in enumerate(candidates):
        label = name if weights in ("imagenet", None) else f"{name} ({weights})"
        t = time.perf_counter()
        left = budget * (1 - _SAVE_RESERVE) - (t - t0)
        if best is not None and left <= 0:
            board.append({"candidate": label, "status": "skipped: no time left", "seconds": 0.0})
            continue
        try:
            estimate = _estimate(name, weights, params, feature_cache, digests) + last_select
        except HeadstartError as exc:
            board.append({"candidate": label, "status": f"skipped: {exc}", "seconds": 0.0})
            continue
        left = budget * (1 - _SAVE_RESERVE) - (time.perf_counter() - t0)
        if best is not None and estimate > left:
            board.append({"candidate": label, "status": f"skipped: estimated {estimate:.0f} s, {max(left, 0):.0f} s "
                          "left", "estimate": estimate, "seconds": time.perf_counter() - t})
            log.info("auto: %s skipped (estimated %.0f s, %.0f s left)", label, estimate, left)
            continue
        clf = ImageClassifier(**(params | {"backbone": name, "weights": weights, "strategy": "frozen",
                                           "head_search": "auto"}), cache=cache if cache else False)
        clf.fit(splits)
        sel = clf.report_.head_selection or {}
        chosen = sel.get("chosen", {})
        score = chosen.get("accuracy", clf.metrics_.get("val", {}).get("accuracy", float("nan")))
        last_select = sel.get("seconds", 0.0)
        row = {"candidate": label, "head": chosen.get("name", "as configured"), "score": score,
               "scored_by": sel.get("method", "validation"), "val_accuracy": clf.metrics_.get("val", {}).get("accuracy"),
               "estimate": estimate, "seconds": time.perf_counter() - t, "status": "trained"}
        board.append(row)
        log.info("auto: %s scored %.4f (%s) in %.0f s", label, score, row["head"], row["seconds"])
        if best is None or _better(row, best[1]):
            best = (clf, row)
    trained = sorted((r for r in board if r["status"] == "trained"), key=lambda r: (-r["score"], r["seconds"]))
    board = trained + [r for r in board if r["status"] != "trained"]
    clf = best[0]
    clf.report_.seconds["total"] = time.perf_counter() - t0
    clf.leaderboard_ = board
    return clf, board


def _better(row: dict, other: dict) -> bool:
    return row["score"] > other["score"] + 1e-9


def _digests(paths) -> list[str | None]:
    out = []
    for p in paths:
        try:
            out.append(file_digest(p))
        except HeadstartError:
            out.append(None)
    return out


def _estimate(name, weights, params, cache, digests) -> float:
    """Seconds a candidate should take: the images its cache lacks times one measured forward pass."""
    bb = create_backbone(name, weights, params.get("input_size")).freeze().eval()
    if cache is not None:
        ns = FeatureCache.namespace(cache_key(bb, pool="avg"))
        maps = FeatureCache.namespace(cache_key(bb))
        have = set(cache.index(ns, refresh=True)) | set(cache.index(maps, refresh=True))
        missing = sum(1 for d in digests if d is None or d not in have)
    else:
        missing = len(digests)
    if not missing:
        return 0.0
    h, w = bb.data_config.input_size
    x = torch.zeros(2, 3, h, w)
    with torch.inference_mode():
        bb(x)  # the first pass pays for allocation
        t = time.perf_counter()
        bb(x)
        per_image = (time.perf_counter() - t) / 2
    return missing * per_image * 1.2 + 3.0  # decoding and the engine's start beside the pass


def format_leaderboard(board: list[dict]) -> list[str]:
    lines = [f"{'candidate':<32} {'head':<34} {'score':>7} {'val acc':>8} {'seconds':>8}  status"]
    for r in board:
        score = f"{r['score']:.4f}" if "score" in r else ""
        val = f"{r['val_accuracy']:.4f}" if r.get("val_accuracy") is not None else ""
        lines.append(f"{r['candidate']:<32} {r.get('head', ''):<34} {score:>7} {val:>8} {r['seconds']:>8.1f}  "
                     f"{r['status']}")
    return lines
