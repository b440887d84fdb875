"""The report's figures, drawn with matplotlib's Agg backend (no display) and returned as PNG bytes.

    >>> png = learning_curves(history)       # bytes of a PNG: loss and accuracy per epoch
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # before pyplot: a run on a server has no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["learning_curves", "confusion", "reliability", "DPI"]

DPI = 96
_TRAIN, _VAL, _BEST, _TUNE = "#1f77b4", "#d62728", "#2ca02c", "#f3e6c5"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def learning_curves(history: list[dict]) -> bytes:
    """Loss and accuracy per epoch, train and val; the saved (best) epoch marked, a fine-tuning stage shaded."""
    epochs = np.array([_number(r.get("epoch")) for r in history])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    tuned = [e for e, r in zip(epochs, history) if r.get("stage") == "finetune"]
    best = [e for e, r in zip(epochs, history) if str(r.get("best")).lower() == "true"]
    for ax, metric, title in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "accuracy")):
        if tuned:
            ax.axvspan(min(tuned) - 0.5, max(tuned) + 0.5, color=_TUNE, label="fine-tuning", zorder=0)
        for split, colour in (("train", _TRAIN), ("val", _VAL)):
            values = np.array([_number(r.get(f"{split}_{metric}")) for r in history])
            if np.isfinite(values).any():
                ax.plot(epochs, values, color=colour, marker="." if len(epochs) < 40 else None, label=split)
        for e in best:
            ax.axvline(e, color=_BEST, linestyle="--", linewidth=1.2, label=f"saved: epoch {e:g}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[1].set_ylim(-0.02, 1.02)
    # fixed margins: tight_layout would draw every figure once more to measure it, a third of a report's time
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.9, wspace=0.2)
    return _png(fig)


def confusion(matrix: list[list[int]], classes: list[str], normalised: bool) -> bytes:
    """The confusion matrix (rows: true class, columns: predicted), as counts or each row divided by its total."""
    from sklearn.metrics import ConfusionMatrixDisplay

    cm = np.asarray(matrix, dtype=np.float64)
    if normalised:
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    side = min(3.2 + 0.45 * n, 16)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    shown = [c if len(c) <= 16 else c[:15] + "…" for c in classes]
    ConfusionMatrixDisplay(cm, display_labels=shown).plot(
        ax=ax, include_values=n <= 20, cmap="Blues", colorbar=n > 20, xticks_rotation=45 if n > 4 else "horizontal",
        values_format=".2f" if normalised else ".0f")
    ax.set_title("row-normalised (recall on the diagonal)" if normalised else "counts")
    # room for the longest class name (about 7 px a character at this size), rotated below and upright beside
    label = max(len(c) for c in shown) * 7 / (side * DPI)
    fig.subplots_adjust(left=min(0.45, 0.08 + label), bottom=min(0.45, 0.15 + (label * 0.75 if n > 4 else 0)),
                        right=0.92 if n > 20 else 0.97, top=0.93)
    return _png(fig)


def reliability(cal: dict) -> bytes:
    """The reliability diagram: accuracy against confidence per bin, with the diagonal of a calibrated model,
    and below it how many images fall in each bin."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.6, 5), height_ratios=(3, 1), sharex=True)
    width = 1.0 / cal["bins"]
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    ax.bar(cal["centre"], cal["accuracy"], width=width * 0.95, color=_TRAIN, alpha=0.75, edgecolor="black",
           label="accuracy in the bin")
    ax.plot(cal["confidence"], cal["accuracy"], color=_VAL, marker="o", linestyle="none",
            label="at the bin's mean confidence")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"expected calibration error {cal['ece']:.3f}")
    ax.legend(fontsize=8, loc="upper left")
    hist.bar(cal["centre"], cal["count"], width=width * 0.95, color="grey")
    hist.set_xlabel("confidence (probability of the predicted class)")
    hist.set_ylabel("images")
    hist.set_xlim(0, 1)
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.1, top=0.94, hspace=0.08)
    return _png(fig)
