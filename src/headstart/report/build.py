"""``build_report``: a run's report as one self-contained HTML file, and its plots as PNG files.

    >>> build_report("run")                       # run/report.html, run/plots/*.png (the run's validation set)
    >>> build_report("run", "photos/test")        # run/report-test.html, run/plots/test/*.png
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np

from .._version import __version__
from ..backbones.concat import ConcatBackbone
from ..data.datasets import Dataset
from ..errors import RunFormatError
from ..io import atomic_write, write_text
from ..runs import read_config
from . import plots
from .analysis import Predictions, calibration
from .sections import data_name, data_section, evaluation_section, image_paths, run_rows
from .thumbs import data_uri, picture_uri, thumbnail_uris

__all__ = ["build_report", "REPORT_FILE", "PLOTS"]

log = logging.getLogger("headstart")

REPORT_FILE = "report.html"
PLOTS = "plots"
GALLERY = 16  # images in the top-losses gallery


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFormatError(f"{str(path)!r} is damaged ({exc}); retrain or restore the run") from exc


def _read_history(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def _own_val_labels(data: dict, classes: list[str]) -> list[int]:
    """The class index of each of the run's validation files: recorded in data.json, or (older runs) the name of
    the folder each file is in."""
    names = data.get("val_labels") or [Path(p).parent.name for p in data.get("val_files", [])]
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise RunFormatError(f"the run's data.json does not say the class of its validation files (folders "
                             f"{unknown[:3]} are not classes); pass the labelled data: headstart report RUN DATA")
    return [classes.index(n) for n in names]


class _Classifier:
    """The run's classifier: the one given, or loaded from the run the first time it is needed."""

    def __init__(self, run: Path, given=None):
        self.run, self.given = run, given

    def __call__(self):
        if self.given is None:
            from ..api import load

            self.given = load(self.run)
        return self.given


def _own_predictions(classes: list[str], data: dict, classifier: _Classifier) -> Predictions | None:
    """The run's validation set: the probabilities the classifier computed in training when it was handed over
    (no pass at all), else the saved model over data.json's ``val_files`` (from the feature cache where it has
    them)."""
    files = data.get("val_files", [])
    if not files:
        return None
    labels = np.array(_own_val_labels(data, classes), dtype=np.int64)
    probs = getattr(classifier.given, "val_proba_", None)
    if probs is not None and len(probs) == len(files):
        unread = np.flatnonzero(np.isnan(probs).any(axis=1))
        return Predictions(files, labels, probs, classes, "validation set",
                           {int(i): "could not be read (see the skipped files)" for i in unread})
    ds = Dataset([(Path(p), int(y)) for p, y in zip(files, labels)], classes, root=str(classifier.run))
    return _predictions(classifier(), ds, "validation set")


def _heatmaps(classifier: _Classifier, rows: list[dict], n: int) -> list:
    """LayerCAM overlays (``headstart.explain``) of the first ``n`` top losses, for their predicted class; None
    for an image it could not explain. A failure costs the heatmaps only, never the report."""
    from ..explain import explain, overlay

    clf = classifier()
    if isinstance(clf.model_.feature_source, ConcatBackbone):
        log.info("the report has no heatmaps: explain takes one backbone, and %s concatenates several",
                 clf.model_.feature_source.name)
        return []
    try:
        found = explain(clf, [Path(r["path"]) for r in rows[:n]])
    except Exception as exc:  # noqa: BLE001 - the report is still worth having without its heatmaps
        log.warning("the report has no heatmaps (%s: %s)", type(exc).__name__, " ".join(str(exc).split())[:300])
        return []
    return [overlay(e) if e.heatmap is not None else None for e in found]


def _predictions(clf, data, name: str) -> Predictions:
    ds, probs, ex = clf.labelled_proba(data)
    return Predictions([str(p) for p in ds.paths], ds.labels, probs, list(ds.classes), name, dict(ex.failed),
                       ex.computed, ex.cached)


def _write_plot(folder: Path, name: str, png: bytes) -> str:
    atomic_write(folder / name, lambda tmp: Path(tmp).write_bytes(png))
    return data_uri(png, "image/png")


def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("headstart.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2")


def build_report(run_dir: str | Path, data: str | Path | None = None, *, out: str | Path | None = None,
                 heatmaps: int = 16, classifier=None, overlays=None) -> Path:
    """Write the report of the run in ``run_dir`` and return the HTML file's path.

    Without ``data``, the run's own validation set is evaluated (its files are listed in data.json): the report
    goes to ``RUN/report.html``, the plots to ``RUN/plots/``. With ``data`` (a folder of class folders or a CSV of
    ``path,label`` rows, as ``headstart evaluate`` takes), the run is evaluated on it: ``RUN/report-<name>.html``
    and ``RUN/plots/<name>/``. ``out`` names another HTML file.

    The first ``heatmaps`` images of the top-losses gallery get a LayerCAM overlay (``headstart.explain``) for
    their predicted class, or the pictures (PIL images) given as ``overlays``, in the gallery's order.

    ``classifier``: the ``ImageClassifier`` just trained and saved in ``run_dir``; its validation probabilities
    and model are used instead of being computed or loaded again.

    Raises:
        RunFormatError: ``run_dir`` is not a run, or its files are damaged.
        DatasetError: ``data`` is not labelled data with this run's classes.
    """
    t0 = time.perf_counter()
    run = Path(run_dir)
    config = read_config(run)
    data_json, metrics = _read_json(run / "data.json"), _read_json(run / "metrics.json")
    history = _read_history(run / "history.csv")
    clf = _Classifier(run, classifier)
    if data is None:
        preds = _own_predictions(list(config["classes"]), data_json, clf)
        out = Path(out) if out is not None else run / REPORT_FILE
        plot_dir = run / PLOTS
    else:
        preds = _predictions(clf(), data, str(data))
        out = Path(out) if out is not None else run / f"report-{data_name(data)}.html"
        plot_dir = run / PLOTS / data_name(data)

    figures = {}
    if history:
        figures["curves"] = _write_plot(plot_dir, "learning_curves.png", plots.learning_curves(history))
    data_sec = data_section(data_json, preds)
    eval_sec = cal = None
    if preds is not None and len(preds.ok):
        eval_sec = evaluation_section(preds, GALLERY)
        cm, classes = eval_sec["confusion"], preds.classes
        figures["confusion"] = _write_plot(plot_dir, "confusion_matrix.png", plots.confusion(cm, classes, False))
        figures["confusion_norm"] = _write_plot(plot_dir, "confusion_matrix_normalised.png",
                                                plots.confusion(cm, classes, True))
        cal = calibration(preds)
        figures["reliability"] = _write_plot(plot_dir, "reliability.png", plots.reliability(cal))
        if overlays is None and heatmaps > 0:
            overlays = _heatmaps(clf, eval_sec["losses"], heatmaps)
        for row, overlay in zip(eval_sec["losses"], list(overlays or [])[:max(0, heatmaps)]):
            if overlay is not None:
                row["overlay"] = picture_uri(overlay)
    thumbs = thumbnail_uris(image_paths(data_sec, eval_sec))
    html = _template().render(
        title=f"headstart report: {config.get('backbone', {}).get('name', '?')} run in {run.resolve().name}",
        run=str(run), run_rows=run_rows(config, data_json, metrics, history, __version__),
        classes=config.get("classes", []), data=data_sec, ev=eval_sec, cal=cal, figures=figures, thumbs=thumbs,
        evaluated=preds.name if preds is not None else None, tuned=any(r.get("stage") == "finetune" for r in history),
        eval_counts=(preds.backbone_passes, preds.from_cache) if preds is not None else None,
        version=__version__, seconds=time.perf_counter() - t0)
    write_text(out, html)
    log.debug("report: %s (%.0f KB, %.1f s)", out, out.stat().st_size / 1024, time.perf_counter() - t0)
    return out
