"""Metrics: accuracy, per-class precision / recall / F1, confusion matrix (scikit-learn underneath)."""

from __future__ import annotations

import numpy as np

__all__ = ["classification_metrics", "format_metrics"]


def classification_metrics(y_true, y_pred, classes: list[str]) -> dict:
    """A JSON-ready dict: ``accuracy``, ``per_class`` {precision, recall, f1, support}, ``confusion_matrix``
    (rows: true class, columns: predicted), ``macro_f1`` and ``n``."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(classes)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else float("nan"),
        "n": int(len(y_true)),
        "macro_f1": float(np.mean(f)) if len(f) else float("nan"),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "classes": list(classes),
    }


def format_metrics(m: dict) -> str:
    """A plain-text report: accuracy, the per-class table and the confusion matrix."""
    classes = m["classes"]
    w = max(12, *(len(c) for c in classes)) + 2
    lines = [f"accuracy  {m['accuracy']:.4f}   ({m['n']} images)", "",
             f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for c in classes:
        r = m["per_class"][c]
        lines.append(f"{c:<{w}}{r['precision']:>10.3f}{r['recall']:>10.3f}{r['f1']:>10.3f}{r['support']:>10d}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              " " * w + "".join(f"{c[:9]:>10}" for c in classes)]
    for c, row in zip(classes, m["confusion_matrix"]):
        lines.append(f"{c:<{w}}" + "".join(f"{v:>10d}" for v in row))
    if m.get("skipped"):
        lines += ["", f"skipped {len(m['skipped'])} unreadable file(s):"] + [f"  {p}: {r}" for p, r in m["skipped"]]
    return "\n".join(lines)
