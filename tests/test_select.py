"""Heads chosen by validation on features: a regularisation that suits the data, cross-validation when the
validation set is small, and a winner that is an ordinary Head (saved, loaded and predicting as before)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import headstart
from headstart.config import HeadConfig, TrainConfig
from headstart.heads import Head
from headstart.training.select import CV_BELOW, select_head

from conftest import FAST, make_folder

QUICK = TrainConfig(epochs=2, patience=1)  # the hidden-layer candidate's loop, kept short


def _blobs(n, dim, informative, noise, seed, classes=2):
    """``classes`` clusters that differ in their first ``informative`` features, plus ``noise`` times their
    spread of noise in every feature."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = rng.normal(0, 1, (classes, dim))
    centres[:, informative:] = 0
    x = centres[y] + noise * rng.normal(0, 1, (n, dim))
    return torch.tensor(x, dtype=torch.float32), y


def _select(x, y, xv=None, yv=None, classes=2):
    template = Head(HeadConfig(pool="avg"), (x.shape[1],), classes)
    return select_head(template, x, y, xv, yv, QUICK)


def test_separable_data_gets_a_weaker_penalty_than_noisy_data():
    x_sep, y_sep = _blobs(60, 40, 40, 0.05, seed=1)
    x_noisy, y_noisy = _blobs(60, 40, 2, 3.0, seed=2)
    _, _, sep = _select(x_sep, y_sep)
    _, _, noisy = _select(x_noisy, y_noisy)
    assert sep["chosen"]["C"] is not None and noisy["chosen"]["C"] is not None
    assert sep["chosen"]["C"] > noisy["chosen"]["C"]
    assert sep["method"].startswith("5-fold cross-validation")
    assert len(sep["candidates"]) >= 8 and all(np.isfinite(r["accuracy"]) for r in sep["candidates"])


def test_the_chosen_logistic_regression_is_the_heads_dense_layer():
    """The head's scores are the fitted regression's (on the head's own standardised inputs)."""
    from sklearn.linear_model import LogisticRegression

    x, y = _blobs(90, 12, 6, 1.0, seed=3, classes=3)
    head, history, sel = _select(x, y, classes=3)
    assert sel["chosen"]["C"] is not None and history[0]["best"]
    z = head.standardize(head.pool(x)).numpy()
    ref = LogisticRegression(C=sel["chosen"]["C"], max_iter=100_000).fit(z, y)
    with torch.no_grad():
        probs = torch.softmax(head.eval()(x), 1).numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(z), atol=2e-3)


def test_a_large_validation_set_is_used_instead_of_cross_validation():
    x, y = _blobs(80, 10, 5, 1.0, seed=4)
    xv, yv = _blobs(CV_BELOW, 10, 5, 1.0, seed=5)
    _, history, sel = _select(x, y, xv, yv)
    assert sel["method"].startswith("the validation set")
    assert "val_accuracy" in history[-1]


def test_training_chooses_the_head_and_the_run_records_the_choice(tmp_path):
    data = make_folder(tmp_path / "data", per_class=6, val_per_class=3)
    clf = headstart.ImageClassifier(**(FAST | {"patience": 3, "head_search": "auto"}), progress=False).fit(data / "train", val=data / "val")
    sel = clf.report_.head_selection
    assert sel["chosen"]["name"] in [r["name"] for r in sel["candidates"]]
    clf.save(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "data.json").read_text())["head_selection"]
    assert saved["chosen"]["name"] == sel["chosen"]["name"]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["training"]["head_selection"]["method"] == sel["method"]
    again = headstart.load(tmp_path / "run")
    assert again.predict(data / "val") == clf.predict(data / "val")
    assert again.score(data / "val") == clf.metrics_["val"]["accuracy"]


def test_head_search_off_trains_the_head_as_given(tmp_path):
    data = make_folder(tmp_path / "data", per_class=6, val_per_class=3)
    clf = headstart.ImageClassifier(**(FAST | {"head_search": "off"}), progress=False).fit(data / "train",
                                                                             val=data / "val")
    assert clf.report_.head_selection is None
    assert len(clf.history_) > 1


def test_an_unknown_head_search_is_refused():
    from headstart.errors import ConfigError

    with pytest.raises(ConfigError, match="head_search"):
        headstart.ImageClassifier(head_search="grid")


def test_wide_features_get_the_regressions_only():
    from headstart.config import HeadConfig
    from headstart.training.select import C_GRID, LOOP_MAX_FEATURES, _candidates

    assert any(c.kind == "loop" for c in _candidates(HeadConfig(), LOOP_MAX_FEATURES))
    wide = _candidates(HeadConfig(), LOOP_MAX_FEATURES + 1)
    assert [c.kind for c in wide] == ["logreg"] * len(C_GRID)
