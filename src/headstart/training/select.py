"""Heads chosen by validation on cached features: the regularisation, the size and the epochs of the head.

    >>> head, history, selection = select_head(template, x_train, y_train, x_val, y_val, TrainConfig())
    >>> selection["chosen"]["name"], selection["method"]
    ('logistic regression C=1', '5-fold cross-validation on train (245 images)')

The candidates are a multinomial logistic regression over a grid of C (scikit-learn, L-BFGS, run to its
tolerance: what linear-probe papers fit), the head as configured trained by the epoch loop (AdamW,
``TrainConfig.weight_decay``), and one hidden layer with dropout (the Keras book's head). Each is scored on the
validation set when it holds at least ``CV_BELOW`` images, else by stratified k-fold cross-validation on train;
the most accurate wins (among equals, the lowest log loss) and is refitted on all of train. Loop candidates
stop by patience alone (``_EPOCH_CEILING`` is a guard, not a budget); the refit runs the folds' mean best epoch.

Whatever wins is a ``Head``: a logistic regression is its linear Dense layer (``coef_`` / ``intercept_``
behind the head's own pooling and standardisation), so saving, predicting, exporting and serving are unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings

import numpy as np
import torch

from ..config import HeadConfig, TrainConfig
from ..heads import Head
from .loop import run_loop

__all__ = ["select_head", "can_select", "C_GRID", "CV_BELOW", "FOLDS", "MLP_HEAD"]

log = logging.getLogger("headstart")

C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
CV_BELOW = 500        # validation sets smaller than this are too noisy to choose by: cross-validate on train
FOLDS = 5
MLP_HEAD = HeadConfig(hidden=(256,), dropout=0.5)  # the Keras book's Dense 256 + dropout 0.5
_EPOCH_CEILING = 20   # loop candidates: at most this many times TrainConfig.epochs, stopped by patience first
# A hidden layer over wider features (flattened maps: 62,720 for efficientnet_lite0 at 224) costs minutes per fold
# on a CPU, against seconds for a logistic regression (fitted in the images' span); such features get the
# regressions only. VGG16's flattened 4x4x512 at 150 (8,192) still gets the hidden layer too.
LOOP_MAX_FEATURES = 8192


@dataclasses.dataclass
class _Candidate:
    name: str
    kind: str                      # "logreg" or "loop"
    head: HeadConfig
    C: float | None = None


def _candidates(configured: HeadConfig, width: int) -> list[_Candidate]:
    cands = [_Candidate(f"logistic regression C={c:g}", "logreg", dataclasses.replace(configured, hidden=(),
                                                                                       dropout=0.0), C=c)
             for c in C_GRID]
    if width > LOOP_MAX_FEATURES:
        return cands
    if configured.hidden:  # a linear head is one of the logistic regressions: only a hidden layer needs the loop
        cands.append(_Candidate("configured head (epoch loop)", "loop", configured))
    else:
        cands.append(_Candidate(f"hidden {MLP_HEAD.hidden[0]} + dropout {MLP_HEAD.dropout:g} (epoch loop)", "loop",
                                dataclasses.replace(configured, hidden=MLP_HEAD.hidden, dropout=MLP_HEAD.dropout)))
    return cands


def select_head(template: Head, x_train: torch.Tensor, y_train, x_val: torch.Tensor | None = None, y_val=None,
                config: TrainConfig = TrainConfig(), device: str = "cpu") -> tuple[Head, list[dict], dict]:
    """Choose and fit a head for features ``x_train`` (maps or pooled, as ``template`` reads them).

    ``template`` gives the pooling and the shapes; its standardisation is fitted here on all of train (it reads
    no labels, so cross-validation folds may share it). Returns the fitted head (a new ``Head`` when the winner's
    size differs from the template's), its training history (one row per epoch, or one row for a logistic
    regression) and the selection: how it was scored, every candidate's score and time, the chosen settings.
    """
    with _one_thread():
        return _select(template, x_train, y_train, x_val, y_val, config, device)


@contextlib.contextmanager
def _one_thread():
    """Torch and BLAS on one thread: these problems are small, and two threads on two busy cores spend their
    time waiting for each other (an epoch of a small head ran 24x slower on two threads here)."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)


def _select(template, x_train, y_train, x_val, y_val, config, device):
    t0 = time.perf_counter()
    y = np.asarray(y_train, dtype=np.int64)
    template.fit_standardizer(template.pool(x_train))
    z = template.standardize(template.pool(x_train)).float()
    zv = yv = None
    if x_val is not None and len(x_val):
        zv, yv = template.standardize(template.pool(x_val)).float(), np.asarray(y_val, dtype=np.int64)
    folds = _folds(y, config.seed) if zv is None or len(zv) < CV_BELOW else None
    if folds is None and zv is None:
        raise ValueError("select_head needs validation data or two training images per class (can_select)")
    method = (f"{len(folds)}-fold cross-validation on train ({len(y)} images)" if folds is not None
              else f"the validation set ({len(yv)} images)")
    rows, fitted = [], {}
    projected = [_Projected(z[tr]) for tr, _ in folds] if folds is not None else [_Projected(z)]
    for cand in _candidates(template.config, z.shape[1]):
        t = time.perf_counter()
        if folds is not None:
            scores = [_fit_score(cand, template, p, y[tr], z[te], y[te], config, device)
                      for (tr, te), p in zip(folds, projected)]
            acc = float(np.mean([s[0] for s in scores]))
            loss = float(np.mean([s[1] for s in scores]))
            epochs = int(round(np.mean([s[2] for s in scores]))) if cand.kind == "loop" else None
        else:
            acc, loss, epochs, fitted[cand.name] = _fit_score(cand, template, projected[0], y, zv, yv, config,
                                                              device, keep=True)
        rows.append({"name": cand.name, "head": cand.head.to_dict(), "C": cand.C, "epochs": epochs,
                     "accuracy": acc, "log_loss": loss, "seconds": time.perf_counter() - t})
        log.info("head candidate %s: accuracy %.4f, log loss %.4f (%.1f s)", cand.name, acc, loss, rows[-1]["seconds"])
    best = min(range(len(rows)), key=lambda i: (-round(rows[i]["accuracy"], 9), rows[i]["log_loss"]))
    cand, chosen = _candidates(template.config, z.shape[1])[best], rows[best]
    if folds is not None:  # refit the winner on all of train
        head, history = _refit(cand, template, _Projected(z) if cand.kind == "logreg" else z, y, zv, yv, config,
                               device, chosen["epochs"])
    else:
        head, history = fitted[cand.name]
    selection = {"method": method, "scored_by": "accuracy, then log loss", "chosen": chosen, "candidates": rows,
                 "seconds": time.perf_counter() - t0}
    return head, history, selection


def can_select(y_train, n_val: int) -> bool:
    """Whether there is something to choose by: a validation set, or two training images in every class."""
    return n_val > 0 or int(np.bincount(np.asarray(y_train, dtype=np.int64)).min()) >= 2


def _folds(y: np.ndarray, seed: int):
    """Stratified folds (as many as the rarest class allows, at most ``FOLDS``), or None with fewer than 2."""
    from sklearn.model_selection import StratifiedKFold

    k = min(FOLDS, int(np.bincount(y).min()))
    if k < 2:
        return None
    return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def _new_head(cand: _Candidate, template: Head) -> Head:
    head = Head(cand.head, _shape(template), template.num_classes)
    head.shift.copy_(template.shift)
    head.scale.copy_(template.scale)
    return head


def _shape(template: Head) -> tuple[int, ...]:
    return (template.in_features,)  # the head reads pooled vectors, so a pooled shape builds the same layers


def _fit_score(cand, template, z, y, zv, yv, config, device, keep=False):
    """Fit ``cand`` on standardised ``z`` (a ``_Projected``) and score it on ``zv``: (accuracy, log loss, best epoch[, (head,
    history)])."""
    head, history = _fit(cand, template, z, y, zv, yv, config, device)
    with torch.no_grad():
        logits = head.layers.eval()(zv)
    acc, loss = _scores(logits, yv)
    epochs = next((r["epoch"] for r in history if r.get("best")), len(history)) if cand.kind == "loop" else None
    return (acc, loss, epochs, (head, history)) if keep else (acc, loss, epochs)


def _scores(logits: torch.Tensor, y: np.ndarray) -> tuple[float, float]:
    yt = torch.as_tensor(y)
    return (float((logits.argmax(1) == yt).double().mean()),
            float(torch.nn.functional.cross_entropy(logits, yt)))


def _fit(cand, template, z, y, zv, yv, config, device, epochs: int | None = None):
    """``cand`` fitted on ``z`` (a ``_Projected``, or a tensor): (head, history)."""
    head = _new_head(cand, template)
    if cand.kind == "logreg":
        return head, _fit_logreg(head, cand.C, z if isinstance(z, _Projected) else _Projected(z), y, zv, yv, config)
    z = z.z if isinstance(z, _Projected) else z
    loop = config if epochs is not None else dataclasses.replace(config, epochs=config.epochs * _EPOCH_CEILING)
    if epochs is not None:  # a refit: exactly the chosen number of epochs, nothing held out to stop on
        loop = dataclasses.replace(config, epochs=max(1, epochs), patience=max(1, epochs))
        zv = yv = None
    return head, _fit_loop(head, z, y, zv, yv, loop, device)


def _refit(cand, template, z, y, zv, yv, config, device, epochs):
    head, history = _fit(cand, template, z, y, None, None, config, device, epochs=epochs)
    if zv is not None and history:  # the saved epoch's validation scores, measured after the choice
        with torch.no_grad():
            acc, loss = _scores(head.layers.eval()(zv), yv)
        for row in history:
            if row.get("best"):
                row["val_loss"], row["val_accuracy"] = loss, acc
    return head, history


def _fit_loop(head: Head, z, y, zv, yv, config: TrainConfig, device: str) -> list[dict]:
    from .head import class_weights

    torch.manual_seed(config.seed)
    for m in head.layers.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    weight = class_weights(y, head.num_classes) if config.class_weight else None
    history = run_loop(head.layers, [{"params": list(head.layers.parameters())}], [z], torch.as_tensor(y),
                       zv, torch.as_tensor(yv) if yv is not None else None, config, class_weight=weight,
                       progress=False, device=device)
    head.layers.to("cpu")
    return history


class _Projected:
    """Training features on the span of the images when there are fewer images than features: an L2-penalised
    logistic regression's weights lie in that span, so fitting on the coordinates there is exact, and many
    times faster for flattened maps. Computed once per fold, shared by every C."""

    def __init__(self, z: torch.Tensor):
        self.z = z
        x = z.numpy().astype(np.float64)
        self.basis = None
        if x.shape[1] > 2 * x.shape[0]:
            _, s, vt = np.linalg.svd(x, full_matrices=False)
            self.basis = vt[s > s.max() * 1e-10]
            x = x @ self.basis.T
        self.x = x


def _fit_logreg(head: Head, C: float, data: "_Projected", y, zv, yv, config: TrainConfig) -> list[dict]:
    """L2 multinomial logistic regression (L-BFGS to its tolerance) copied into the head's Dense layer."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    t = time.perf_counter()
    model = LogisticRegression(C=C, max_iter=100_000, class_weight=config.class_weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            model.fit(data.x, y)
        except ConvergenceWarning:
            log.warning("logistic regression C=%g did not converge in %d iterations", C, model.max_iter)
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(data.x, y)
    coef = model.coef_ @ data.basis if data.basis is not None else model.coef_
    bias = model.intercept_
    if coef.shape[0] == 1:  # binary: one score for class 1; as two logits, the same probabilities
        coef, bias = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-bias / 2, bias / 2])
    full = np.zeros((head.num_classes, coef.shape[1]))
    full_b = np.full(head.num_classes, -1e4 if len(model.classes_) < head.num_classes else 0.0)
    full[model.classes_], full_b[model.classes_] = coef, bias  # a class missing from a fold is never predicted
    with torch.no_grad():
        head.layers.predictions.weight.copy_(torch.as_tensor(full, dtype=torch.float32))
        head.layers.predictions.bias.copy_(torch.as_tensor(full_b, dtype=torch.float32))
    head.eval()
    with torch.no_grad():
        train_acc, train_loss = _scores(head.layers(data.z), y)
    row = {"epoch": 1, "train_loss": train_loss, "train_accuracy": train_acc, "iterations": int(model.n_iter_.max())}
    if zv is not None:
        with torch.no_grad():
            row["val_loss"], row["val_accuracy"] = _scores(head.layers(zv), yv)
    row |= {"seconds": time.perf_counter() - t, "best": True}
    return [row]
