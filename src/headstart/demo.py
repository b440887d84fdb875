"""``headstart demo``: a real dataset that ships with scikit-learn (handwritten digits), written out as
PNG class folders, then trained on, evaluated and predicted, all offline."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .api import ImageClassifier, load
from .errors import StorageError
from .evaluation import format_metrics

__all__ = ["write_digits", "run_demo", "clean_demo_folder"]

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


_MARK = ".headstart-demo"  # written into a demo folder, so a later demo knows it may clear it


def clean_demo_folder(out: Path) -> None:
    """Make ``out`` an empty demo folder: an earlier demo's files are removed, so runs never mix.

    Raises:
        StorageError: ``out`` is a file, or a non-empty folder that no demo made (nothing of it is touched).
    """
    if out.exists() and not out.is_dir():
        raise StorageError(f"{str(out)!r} is a file; give the demo a folder with --out")
    if out.is_dir() and any(out.iterdir()):
        if not _made_by_demo(out):
            raise StorageError(f"{str(out)!r} is not empty and no demo made it; choose another --out (the demo "
                               "replaces what an earlier demo left there, nothing else)")
        for name in ("digits", "run"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MARK).write_text("made by `headstart demo`; a later demo may replace this folder's contents\n")


def _made_by_demo(out: Path) -> bool:
    """``out`` has the mark, or (an earlier version's demo) holds only the digits and the run trained on them."""
    names = {p.name for p in out.iterdir()}
    return (out / _MARK).is_file() or (names <= {"digits", "run"} and (out / "digits" / "train" / "0").is_dir())


def run_demo(out: Path, per_class: int = 60, backbone: str = "efficientnet_lite0") -> dict:
    """Write the digits under ``out/digits``, train into ``out/run``, evaluate and predict, printing as it goes;
    an earlier demo in ``out`` is replaced (``clean_demo_folder``). Returns the validation metrics."""
    t0 = time.perf_counter()
    clean_demo_folder(out)
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
