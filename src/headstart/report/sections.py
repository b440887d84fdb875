"""The report's sections as plain data for the template: the run, the data, the evaluation. Each function reads
a run's files (``config.json``, ``data.json``, ``metrics.json``, ``history.csv``) or a ``Predictions``; none
draws or writes anything.
"""

from __future__ import annotations

from pathlib import Path

from .analysis import Predictions, most_confused, top_losses

__all__ = ["run_rows", "data_section", "evaluation_section", "LIMIT"]

LIMIT = 48  # rows (and thumbnails) per list; the rest are counted and left to data.json


def _seconds(value) -> str:
    return f"{value:.1f} s" if isinstance(value, (int, float)) else "not recorded"


def _head(head: dict) -> str:
    hidden = head.get("hidden") or []
    text = f"{head.get('pool', '?')} pooling"
    if hidden:
        text += ", Dense " + " -> ".join(map(str, hidden))
    if head.get("dropout"):
        text += f", dropout {head['dropout']}"
    return text + ", then the classifier"


def _data_config(dc: dict | list) -> str:
    if isinstance(dc, list):  # a concatenation: one per member
        return "; ".join(f"member {i + 1}: {_data_config(d)}" for i, d in enumerate(dc))
    size = "x".join(map(str, dc.get("input_size", [])))
    mean = ", ".join(f"{v:g}" for v in dc.get("mean", []))
    std = ", ".join(f"{v:g}" for v in dc.get("std", []))
    return (f"input {size}, resize {dc.get('resize_mode', '?')} (crop {dc.get('crop_pct', '?')}), "
            f"{dc.get('interpolation', '?')}; mean {mean}; std {std}")


def _best(history: list[dict]) -> str:
    best = next((r for r in history if str(r.get("best")).lower() == "true"), None)
    if best is None:
        return "not recorded"
    score = (f"val accuracy {float(best['val_accuracy']):.4f}, val loss {float(best['val_loss']):.4f}"
             if best.get("val_accuracy") not in (None, "") else f"train loss {float(best['train_loss']):.4f}")
    return f"epoch {best.get('epoch')} of {len(history)} ({best.get('stage', 'head')} stage): {score}"


def run_rows(config: dict, data: dict, metrics: dict, history: list[dict], version: str) -> list[tuple[str, str]]:
    """(label, value) rows describing the run: what was trained, how, with what, and how long it took."""
    bb = config.get("backbone", {})
    training = config.get("training", {})
    recipe = training.get("recipe") or data.get("recipe") or {}
    train = training.get("train_config", {})
    seconds = data.get("seconds", {})
    passes, cached = data.get("backbone_passes", {}), data.get("from_cache", {})
    strategy = recipe.get("strategy", "?")
    if strategy != "frozen":
        strategy += f" (augment {recipe.get('augment')}, {recipe.get('views')} views"
        strategy += f", unfreeze {recipe.get('unfreeze') or 'default'}, fine-tune lr {recipe.get('finetune_lr')})" \
            if recipe.get("strategy") == "finetune" else ")"
    rows = [
        ("backbone", f"{bb.get('name', '?')} (features {'x'.join(map(str, bb.get('feature_shape', [])))})"),
        ("weights", f"{bb.get('weights_source', '?')} (given as {training.get('weights', '?')})"),
        ("weights digest", str(bb.get("weights_digest", "?"))),
        ("strategy", strategy),
        ("head", _head(config.get("head", {}))),
        ("data config", _data_config(config.get("data_config", {}))),
        ("training settings", ", ".join(f"{k.replace('_', ' ')} {train[k]}" for k in
                                        ("epochs", "batch_size", "lr", "weight_decay", "patience", "seed")
                                        if k in train) or "not recorded"),
        ("validation", str(data.get("split", "not recorded"))),
        ("saved weights", _best(history)),
        ("time", f"extraction {_seconds(seconds.get('extraction'))}, training {_seconds(seconds.get('training'))}"
                 + (f", label-error check {_seconds(seconds['label_errors'])}" if "label_errors" in seconds else "")
                 + f", whole run {_seconds(seconds.get('total'))}"),
        ("backbone passes", ", ".join(f"{split} {n} through the backbone, {cached.get(split, 0)} from the cache"
                                      for split, n in passes.items()) or "not recorded"),
        ("headstart version", str(config.get("headstart_version", "?"))
         + ("" if config.get("headstart_version") == version else f" (this report: {version})")),
    ]
    test = metrics.get("test")
    if test:
        rows.append(("test set", f"accuracy {test['accuracy']:.4f}, macro F1 {test['macro_f1']:.4f} "
                                 f"({test['n']} images)"))
    return rows


def _limited(items: list, limit: int = LIMIT) -> tuple[list, int]:
    return items[:limit], max(0, len(items) - limit)


def data_section(data: dict, preds: Predictions | None) -> dict:
    """Images per class and split, skipped and ignored files, suspects, duplicates and likely label errors;
    thumbnails are added by the caller (the ``path`` keys)."""
    classes = list(data.get("classes") or (preds.classes if preds else []))
    splits = {"train": data.get("train_counts", {}), "val": data.get("val_counts", {})}
    if preds is not None and preds.name != "validation set":
        counts = {c: 0 for c in preds.classes}
        for y in preds.labels:
            counts[preds.classes[y]] += 1
        splits[preds.name] = counts
    splits = {k: v for k, v in splits.items() if v}
    counts = [{"class": c, "counts": [splits[s].get(c, 0) for s in splits]} for c in classes]
    totals = [sum(v.values()) for v in splits.values()]
    skipped = [{"path": p, "reason": r} for p, r in data.get("skipped_unreadable", [])]
    if preds is not None and preds.name != "validation set":
        skipped += [{"path": preds.paths[i], "reason": r} for i, r in sorted(preds.errors.items())]
    ignored = [{"path": p, "reason": r} for p, r in data.get("ignored", [])]
    suspects = [{"path": s.get("path"), "class": s.get("class", ""), "reason": s.get("reason", "")}
                for s in data.get("suspect_images", [])]
    train_val = [{"a": a, "b": b} for a, b in data.get("train_val_duplicates", [])]
    across = [{"a": d.get("a"), "b": d.get("b"), "similarity": d.get("similarity"),
               "labels": d.get("labels", [])} for d in data.get("duplicates_across_classes", [])]
    errors = sorted(data.get("label_errors", []), key=lambda e: e.get("rank", 0))
    out = {"splits": list(splits), "counts": counts, "totals": totals, "has_label_check": "label_errors" in data}
    for key, items in (("skipped", skipped), ("ignored", ignored), ("suspects", suspects), ("train_val", train_val),
                       ("across", across), ("label_errors", errors)):
        out[key], out[f"{key}_more"] = _limited(items)
    return out


def evaluation_section(preds: Predictions, gallery: int) -> dict:
    """Metrics, per-class rows, the most-confused pairs and the top losses of ``preds``."""
    m = preds.metrics()
    cm = m["confusion_matrix"]
    per_class = [{"class": c, **m["per_class"][c]} for c in preds.classes]
    return {"metrics": m, "per_class": per_class, "confusion": cm, "pairs": most_confused(cm, preds.classes),
            "losses": top_losses(preds, gallery), "n": m["n"], "unread": len(preds.errors),
            "show_table": len(preds.classes) <= 20}


def image_paths(data_sec: dict, eval_sec: dict | None) -> list[str]:
    """Every path the report shows a thumbnail of."""
    paths = [s["path"] for s in data_sec["suspects"]] + [e.get("path") for e in data_sec["label_errors"]]
    paths += [p for d in data_sec["train_val"] + data_sec["across"] for p in (d["a"], d["b"])]
    if eval_sec is not None:
        paths += [r["path"] for r in eval_sec["losses"]]
    return [str(p) for p in paths if p]


def data_name(data: str | Path) -> str:
    """A short name for a data set, for file names (``report-<name>.html``): its folder or file name."""
    path = Path(data)
    name = path.stem if path.suffix else path.name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "data"
