"""Accuracy and time of headstart's heads, and of its training strategies, on image folders (train -> val).

    python benchmarks/accuracy.py ../shared/datasets/hymenoptera_data \
        --weights-vgg16 ../shared/weights/vgg16_imagenet_notop.safetensors

The heads table, per data set (the given folder, headstart's demo digits, a generated set of shapes) and
backbone (efficientnet_lite0; VGG16 at 150 with the flatten head, the seed recipe, on the given folder): the
default (head chosen by cross-validation), the head as before (``head_search="off"``), a plain logistic-
regression probe on the same cached features (scikit-learn defaults, C=1, on the head's standardised inputs),
and the probe's ceiling (the best C of a grid, chosen on val itself: optimistic, a bound, not a method); then
``--auto`` (with ``--auto-budget``) when asked for; ``--concat a+b`` adds the same rows for that concatenation
of backbones on the given folder. Features are extracted once into one cache (--cache,
default a new folder), timed on their own; each training then reads them from it.

``--strategies frozen frozen-aug finetune`` adds the older table: each strategy with its defaults, each run on
its own empty cache, and the frozen-aug comparison with the naive loop (frozen base run every epoch).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import headstart
from headstart.data import load_splits
from headstart.data.augment import AugmentedView, preset
from headstart.features import extract_features, members
from headstart.heads import Head, HeadConfig


def _fresh_cache() -> str:
    return tempfile.mkdtemp(prefix="hs-bench-cache-")


def run_strategy(data, backbone, weights, input_size, head, strategy, extra=None) -> dict:
    cache = _fresh_cache()
    t0 = time.perf_counter()
    clf = headstart.ImageClassifier(backbone=backbone, weights=weights, input_size=input_size, head=head,
                                    strategy=strategy, cache=cache, progress=False, **(extra or {})).fit(data)
    seconds = time.perf_counter() - t0
    passes = sum(clf.report_["backbone_passes"].values())
    label = strategy + (f" {extra['epochs']}ep" if extra and "epochs" in extra else "")
    row = {"strategy": label, "backbone": backbone, "input": clf.model_.data_config.input_size[0],
           "val_acc": clf.metrics_["val"]["accuracy"], "seconds": seconds, "passes": passes}
    clf.tta = True
    row["val_acc_tta"] = clf.evaluate(Path(data) / "val")["accuracy"] if (Path(data) / "val").is_dir() else None
    return row


def run_naive_frozen_aug(data, backbone, weights, input_size, head, epochs, augment="light", seed=0) -> dict:
    """The textbook loop: every epoch, run the frozen base on freshly augmented images and on val."""
    t0 = time.perf_counter()
    splits = load_splits(data, seed=seed)
    bb = headstart.create_backbone(backbone, weights, input_size).freeze()
    model_head = Head(HeadConfig(pool=head or bb.entry.default_head), bb.feature_shape, len(splits.train.classes))
    torch.manual_seed(seed)
    opt = None
    passes, acc = 0, 0.0
    for epoch in range(epochs):
        view = AugmentedView(bb.data_config, preset(augment), index=1000 + epoch, seed=seed)
        tr = extract_features(bb, splits.train.paths, None, transform=view, progress=False)
        va = extract_features(bb, splits.val.paths, None, progress=False)
        passes += len(tr.ok) + len(va.ok)
        y = torch.as_tensor(splits.train.labels[tr.ok])
        if opt is None:
            model_head.fit_standardizer(model_head.pool(tr.features))
            opt = torch.optim.AdamW(model_head.layers.parameters(), lr=1e-3, weight_decay=5.0)
        x = model_head.standardize(model_head.pool(tr.features))
        model_head.layers.train()
        order = torch.randperm(len(y))
        for i in range(0, len(y), 32):
            idx = order[i:i + 32]
            loss = torch.nn.functional.cross_entropy(model_head.layers(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model_head.eval()
        with torch.no_grad():
            pred = model_head(va.features).argmax(1).numpy()
        acc = float((pred == splits.val.labels[va.ok]).mean())
    return {"strategy": "naive aug loop", "backbone": backbone, "input": bb.data_config.input_size[0],
            "val_acc": acc, "seconds": time.perf_counter() - t0, "passes": passes, "val_acc_tta": None}


SHAPES = ("circle", "square", "triangle")


def write_shapes(root: Path, per_class: int = 40, val_per_class: int = 20, seed: int = 0) -> Path:
    """A generated set: outlined shapes of random size, place, colour and line width on noisy backgrounds."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for shape in SHAPES:
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                bg = rng.integers(0, 256, 3)
                a = np.clip(bg + rng.normal(0, 25, (96, 96, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(a)
                d = ImageDraw.Draw(img)
                r = int(rng.integers(14, 36))
                cx, cy = (int(v) for v in rng.integers(r + 2, 96 - r - 2, 2))
                colour, width = tuple(int(v) for v in rng.integers(0, 256, 3)), int(rng.integers(2, 6))
                box = [cx - r, cy - r, cx + r, cy + r]
                if shape == "circle":
                    d.ellipse(box, outline=colour, width=width)
                elif shape == "square":
                    d.rectangle(box, outline=colour, width=width)
                else:
                    d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], outline=colour, width=width)
                img.save(folder / f"{shape}_{i:03d}.png")
    return root


def _pooled(clf_head, backbone, paths, cache):
    """The head's standardised inputs for ``paths``, from the cache (as training read them)."""
    ex = extract_features(backbone, paths, cache, pool=clf_head.feature_pool, progress=False)
    return clf_head.standardize(clf_head.pool(ex.features)).numpy(), ex.ok


def heads_rows(name, data, backbone, weights, size, head, cache_dir, auto_budget=None) -> list[dict]:
    """Default, head as before, logistic-regression probe (and its val ceiling), and --auto, on one data set."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from headstart.features import FeatureCache
    from headstart.training.select import C_GRID

    cache = FeatureCache(cache_dir)
    splits = load_splits(data, seed=0)
    bb = headstart.create_backbone(backbone, weights, size).freeze()
    sizes = "+".join(str(m.data_config.input_size[0]) for m in members(bb))
    label = (backbone if "+" in backbone else f"{backbone}@{sizes}") + (f" {head}" if head else "")
    t0 = time.perf_counter()
    template = Head(HeadConfig(pool=head or bb.default_head), bb.feature_shape, len(splits.train.classes))
    for ds in (splits.train, splits.val):
        extract_features(bb, ds.paths, cache, pool=template.feature_pool, progress=False)
    rows = [{"data": name, "backbone": label, "what": "feature extraction (train + val, once)", "val_acc": None,
             "seconds": time.perf_counter() - t0, "note": f"{len(splits.train)} train, {len(splits.val)} val"}]

    def fit(what, **extra):
        t = time.perf_counter()
        clf = headstart.ImageClassifier(backbone=backbone, weights=weights, input_size=size, head=head,
                                        cache=cache_dir, progress=False, **extra).fit(splits)
        note = ""
        sel = clf.report_.head_selection
        if sel:
            note = f"{sel['chosen']['name']} (CV {sel['chosen']['accuracy']:.4f})"
        board = getattr(clf.report_, "leaderboard", None)
        if board:
            note = f"best: {board[0]['candidate']}"
        rows.append({"data": name, "backbone": label, "what": what, "val_acc": clf.metrics_["val"]["accuracy"],
                     "seconds": time.perf_counter() - t, "note": note})
        return clf

    clf = fit("default (head chosen by CV)")
    fit("head as before (--head-search off)", head_search="off")
    # the probe reads the same inputs as the head: pooled, L2-normalised, standardised on train
    template.fit_standardizer(template.pool(extract_features(bb, splits.train.paths, cache,
                                                              pool=template.feature_pool, progress=False).features))
    x, ok = _pooled(template, bb, splits.train.paths, cache)
    xv, okv = _pooled(template, bb, splits.val.paths, cache)
    y, yv = splits.train.labels[ok], splits.val.labels[okv]
    with threadpool_limits(1):
        t = time.perf_counter()
        probe = LogisticRegression(max_iter=100_000).fit(x, y)
        rows.append({"data": name, "backbone": label, "what": "logistic regression probe (C=1)",
                     "val_acc": float(probe.score(xv, yv)), "seconds": time.perf_counter() - t, "note": ""})
        t = time.perf_counter()
        scores = {c: float(LogisticRegression(C=c, max_iter=100_000).fit(x, y).score(xv, yv)) for c in C_GRID}
        best = max(scores, key=scores.get)
        rows.append({"data": name, "backbone": label, "what": "probe ceiling (best C chosen on val)",
                     "val_acc": scores[best], "seconds": time.perf_counter() - t,
                     "note": f"C={best:g}; " + " ".join(f"{c:g}:{a:.3f}" for c, a in scores.items())})
    if auto_budget:
        fit(f"--auto --time-budget {auto_budget}", auto=True, time_budget=auto_budget)
    return rows


def _print_heads(rows, header):
    if header:
        print(f"| {'data':<12} | {'backbone':<28} | {'head':<40} | {'val acc':>7} | {'time s':>7} | note |")
        print(f"|{'-' * 14}|{'-' * 30}|{'-' * 42}|{'-' * 9}|{'-' * 9}|---|")
    for r in rows:
        acc = "" if r["val_acc"] is None else f"{r['val_acc']:.4f}"
        print(f"| {r['data']:<12} | {r['backbone']:<28} | {r['what']:<40} | {acc:>7} | {r['seconds']:>7.1f} | "
              f"{r['note']} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="folder with train/ and val/ class folders")
    ap.add_argument("--weights-vgg16", help="VGG16 notop weights file (for the Keras seed recipe rows)")
    ap.add_argument("--cache", help="feature cache of the heads table (default: a new folder)")
    ap.add_argument("--sets", nargs="*", default=["data", "digits", "shapes"], help="data sets of the heads table")
    ap.add_argument("--concat", nargs="*", default=[], help="concatenated backbones of the heads table on the given "
                    "folder (e.g. efficientnet_lite0+efficientnet_lite2)")
    ap.add_argument("--auto-budget", help="also train with --auto and this --time-budget (e.g. 5m)")
    ap.add_argument("--backbones", nargs="*", default=["efficientnet_lite0", "efficientnet_lite2"],
                    help="backbones of the strategies table")
    ap.add_argument("--strategies", nargs="*", default=[], help="the strategies table (frozen frozen-aug finetune)")
    ap.add_argument("--epochs", type=int, default=15,
                    help="epochs of the frozen-aug vs naive-loop comparison (both without early stopping)")
    ap.add_argument("--skip-naive", action="store_true", help="(strategies table) leave out the naive loop")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    t_start = time.perf_counter()
    cache_dir = args.cache or _fresh_cache()
    work = Path(tempfile.mkdtemp(prefix="hs-bench-data-"))
    sets = {"data": Path(args.data).name}
    heads = []
    for key in args.sets:
        if key == "data":
            data = args.data
        elif key == "digits":
            from headstart.demo import write_digits
            data = write_digits(work / "digits")
        else:
            data = write_shapes(work / "shapes")
        configs = [("efficientnet_lite0", "imagenet", None, None)]
        if key == "data" and args.weights_vgg16:
            configs.append(("vgg16", args.weights_vgg16, 150, "flatten"))
        if key == "data":
            configs += [(name, "imagenet", None, None) for name in args.concat]
        for backbone, weights, size, head in configs:
            rows = heads_rows(sets.get(key, key), data, backbone, weights, size, head, cache_dir, args.auto_budget)
            _print_heads(rows, header=not heads)
            heads += rows
    if heads:
        print(f"\nheads table: {time.perf_counter() - t_start:.0f} s, load average {os.getloadavg()[0]:.2f} "
              f"(1 min) at the end, {len(os.sched_getaffinity(0))} cores")
    if not args.strategies:
        return
    rows = []
    configs = [(b, "imagenet", None, None) for b in args.backbones]
    if args.weights_vgg16:
        configs.append(("vgg16", args.weights_vgg16, 150, "flatten"))
    for backbone, weights, size, head in configs:
        for strategy in args.strategies:  # each with its defaults
            rows.append(run_strategy(args.data, backbone, weights, size, head, strategy))
            _print(rows[-1:], header=len(rows) == 1)
    if not args.skip_naive:
        b = args.backbones[0]
        rows.append(run_strategy(args.data, b, "imagenet", None, None, "frozen-aug",
                                 {"epochs": args.epochs, "patience": args.epochs}))
        _print(rows[-1:], header=False)
        aug = rows[-1]
        rows.append(run_naive_frozen_aug(args.data, b, "imagenet", None, None, args.epochs))
        _print(rows[-1:], header=False)
        print(f"\nfrozen-aug (cached views) vs naive loop, {b}: accuracy {aug['val_acc']:.4f} vs "
              f"{rows[-1]['val_acc']:.4f} (difference {100 * (aug['val_acc'] - rows[-1]['val_acc']):+.1f} points); "
              f"time {aug['seconds']:.0f} s vs {rows[-1]['seconds']:.0f} s (ratio {aug['seconds'] / rows[-1]['seconds']:.2f})")


def _print(rows, header):
    if header:
        print(f"{'strategy':<16}{'backbone':<20}{'input':>6}{'val acc':>9}{'+tta':>8}{'time s':>9}{'passes':>8}")
    for r in rows:
        tta = "" if r["val_acc_tta"] is None else f"{r['val_acc_tta']:.4f}"
        print(f"{r['strategy']:<16}{r['backbone']:<20}{r['input']:>6}{r['val_acc']:>9.4f}{tta:>8}"
              f"{r['seconds']:>9.1f}{r['passes']:>8}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
