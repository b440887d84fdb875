"""``headstart demo``: a real dataset that ships with scikit-learn (handwritten digits), written out as
PNG class folders, then trained on, evaluated and predicted, all offline."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .api import ImageClassifier, load
from .evaluation import format_metrics

__all__ = ["write_digits", "run_demo"]

log = logging.getLogger("headstart")


def write_digits(root: Path, per_class: int = 60, val_per_class: int = 20, seed: int = 0) -> Path:
    """Write scikit-learn's 8x8 digits as 64x64 PNGs under ``root/train/<digit>/`` and ``root/val/<digit>/``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        for split, chosen in (("train", idx[:per_class]), ("val", idx[per_class:per_class + val_per_class])):
            folder = root / split / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                Image.fromarray(pixels).resize((64, 64), Image.BILINEAR).save(folder / f"digit_{i:04d}.png")
    return root


def run_demo(out: Path, per_class: int = 60, backbone: str = "efficientnet_lite0") -> dict:
    t0 = time.perf_counter()
    data = write_digits(out / "digits", per_class=per_class)
    print(f"data: scikit-learn digits as PNG folders in {data} ({per_class} train + 20 val images per class)")
    run = out / "run"
    clf = ImageClassifier(backbone=backbone).fit(data)
    clf.save(run)
    print(f"trained {backbone} (frozen) + head in {time.perf_counter() - t0:.1f} s; run saved to {run}")
    clf = load(run)
    metrics = clf.evaluate(data / "val")
    print(format_metrics(metrics))
    samples = sorted((data / "val").glob("*/*.png"))[::40][:5]
    print("\npredictions (top 3):")
    for row in clf.predictor().predict(samples, top_k=3):
        top = "  ".join(f"{t['label']} {t['probability']:.2f}" for t in row["top_k"])
        print(f"  {Path(row['path']).parent.name}/{Path(row['path']).name}: {top}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s")
    return metrics
