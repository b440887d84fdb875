"""Are flipped labels found? Flip 5%, 10%, 20% of a data set's training labels (seeded), run the label-error
finder on the cached features, and print precision@k (k = number flipped; it equals recall@k here) and seconds.

    python benchmarks/label_errors.py ../shared/datasets/hymenoptera_data

Also prints what sets the near-duplicate threshold: the feature similarity of altered copies of photos
(re-encoded, resized, cropped) to their originals, against each original photo's most similar other photo.
Features are extracted once (the feature cache: $HEADSTART_CACHE); the finder never runs the backbone.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from headstart.backbones.base import create_backbone
from headstart.data import load_dataset
from headstart.features import FeatureCache, extract_features
from headstart.label_errors import DUPLICATE_SIMILARITY, find_label_errors, same_class_level


def _flipped(labels: np.ndarray, n_classes: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(labels), size=round(share * len(labels)), replace=False)
    noisy = labels.copy()
    noisy[idx] = (labels[idx] + rng.integers(1, n_classes, size=len(idx))) % n_classes  # always another class
    return noisy, idx


def _copies(paths: list[Path]) -> list[bytes]:
    out = []
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            w, h = im.size
            kind = i % 3
            if kind == 1:
                im = im.resize((int(w * 0.7), int(h * 0.7)))
            elif kind == 2:
                im = im.crop((int(w * 0.05), int(h * 0.05), int(w * 0.95), int(h * 0.95)))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=60 if kind == 0 else 85)
            out.append(buf.getvalue())
    return out


def _unit(z: np.ndarray, mean: np.ndarray) -> np.ndarray:
    z = z - mean
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", type=Path, help="a folder with train/<class>/ (or a folder of class folders)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--copies", type=int, default=30, help="altered copies for the duplicate threshold")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    train = load_dataset(args.data / "train" if (args.data / "train").is_dir() else args.data)
    backbone = create_backbone(args.backbone).freeze()
    t0 = time.perf_counter()
    ex = extract_features(backbone, train.paths, FeatureCache.default(), pool="avg", progress=False)
    extract_s = time.perf_counter() - t0
    x = ex.features.numpy()
    labels, paths = train.labels[ex.ok], [str(train.paths[i]) for i in ex.ok]
    load = os.getloadavg()
    print(f"label errors benchmark: {args.data}, {len(paths)} readable train images, {len(train.classes)} classes, "
          f"{args.backbone} (features: {ex.computed} backbone passes, {ex.cached} from the cache, {extract_s:.1f} s); "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| flipped | k | precision@k (mean over seeds) | per seed | cleanlab flagged (mean) | seconds per run |")
    print("|---|---|---|---|---|---|")
    for share in args.shares:
        precisions, flagged, seconds = [], [], []
        for seed in args.seeds:
            noisy, idx = _flipped(labels, len(train.classes), share, seed)
            found = find_label_errors(x, noisy, train.classes, paths, seed=seed)
            top = np.argsort(found.quality, kind="stable")[:len(idx)]
            precisions.append(len(set(top.tolist()) & set(idx.tolist())) / len(idx))
            flagged.append(len(found.suspects))
            seconds.append(found.seconds)
        print(f"| {share:.0%} | {len(idx)} | {np.mean(precisions):.3f} | "
              f"{' '.join(f'{p:.2f}' for p in precisions)} | {np.mean(flagged):.1f} | {np.mean(seconds):.2f} |")
    clean = find_label_errors(x, labels, train.classes, paths)
    print(f"\nunflipped labels: {len(clean.suspects)} flagged, {len(clean.duplicates)} near-duplicate pair(s) across "
          f"classes; first flagged: " + ", ".join(f"{s['path']} ({s['given']}, q={s['quality']:.2f})"
                                               for s in clean.suspects[:5]))
    # the threshold: altered copies against the nearest other photo
    chosen = list(range(0, len(paths), max(1, len(paths) // args.copies)))[:args.copies]
    cex = extract_features(backbone, _copies([Path(paths[i]) for i in chosen]), None, pool="avg", progress=False)
    mean = x.mean(0)
    z, c = _unit(x, mean), _unit(cex.features.numpy(), mean)
    sims = z @ z.T
    np.fill_diagonal(sims, -1)
    copy_sims = np.sum(c * z[[chosen[i] for i in cex.ok]], axis=1)
    print(f"duplicate threshold {DUPLICATE_SIMILARITY}: altered copies vs their originals: min {copy_sims.min():.3f}, "
          f"median {np.median(copy_sims):.3f} ({len(copy_sims)} copies: JPEG q60, 70% resize, 90% crop); each "
          f"photo's most similar other photo: max {sims.max():.3f}, 99th percentile "
          f"{np.percentile(sims.max(1), 99):.3f}, median {np.median(sims.max(1)):.3f}")
    level = same_class_level(np.where(labels[:, None] == labels[None, :], sims, -1.0).max(axis=1))
    print(f"same-class level (95% of the images' most similar class-mate score at most this): {level:.3f}; pairs are "
          f"reported from {max(DUPLICATE_SIMILARITY, level):.3f}; altered copies at or above it: "
          f"{(copy_sims >= max(DUPLICATE_SIMILARITY, level)).sum()} of {len(copy_sims)}")


if __name__ == "__main__":
    main()
