"""Accuracy and time of each training strategy on an image-folder dataset (train -> val), side by side.

    python benchmarks/accuracy.py ../shared/datasets/hymenoptera_data \
        --weights-vgg16 ../shared/weights/vgg16_imagenet_notop.safetensors

Prints one table: strategy, backbone, input size, validation accuracy, training time, backbone passes;
and the frozen-aug comparison with the naive loop (frozen base run every epoch with the same augmentation
and epochs). Each run uses its own empty feature cache, so times include every backbone pass.
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
from headstart.features import extract_features
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="folder with train/ and val/ class folders")
    ap.add_argument("--weights-vgg16", help="VGG16 notop weights file (for the Keras seed recipe rows)")
    ap.add_argument("--backbones", nargs="*", default=["efficientnet_lite0", "efficientnet_lite2"])
    ap.add_argument("--strategies", nargs="*", default=["frozen", "frozen-aug", "finetune"])
    ap.add_argument("--epochs", type=int, default=15,
                    help="epochs of the frozen-aug vs naive-loop comparison (both without early stopping)")
    ap.add_argument("--skip-naive", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
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
