"""Fuzzing what a saved model says about itself: whatever values config.json (and the copy inside the weights)
or an ONNX export's metadata hold, loading and predicting ends in finite probabilities or headstart's own
one-line error, within a time bound: never another exception, a hang or a NaN answer."""

from __future__ import annotations

import json
import math
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import headstart
from conftest import FAST, fuzz_examples, make_folder, make_image
from headstart.cli import error_message
from headstart.errors import HeadstartError
from test_trust import rewrite_config

SECONDS_PER_CASE = 20  # the slowest legal case (a 4096 px input) takes a few seconds on a loaded 2-core machine

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6),
                    st.sampled_from([0, 1, -1, 0.5, 1e-12, 1e308, math.nan, math.inf, -math.inf]))
anything = st.one_of(numbers, st.none(), st.booleans(), st.text(max_size=5), st.lists(numbers, max_size=4),
                     st.dictionaries(st.text(max_size=3), numbers, max_size=2))
sides = st.one_of(st.integers(-2, 40), st.sampled_from([64, 4096, 4097, 20000]), anything)
near = st.sampled_from([0.5, 0.25, 1.0, 0, -1, 1e-12, 1e308, math.nan, math.inf, -math.inf, "0.5", None])
FIELDS = {
    "input_size": st.one_of(st.lists(sides, min_size=2, max_size=2), st.lists(sides, max_size=3), anything),
    "mean": st.one_of(st.lists(near, min_size=3, max_size=3), st.lists(numbers, min_size=3, max_size=3), st.lists(numbers, max_size=4), anything),
    "std": st.one_of(st.lists(near, min_size=3, max_size=3), st.lists(numbers, min_size=3, max_size=3), st.lists(numbers, max_size=4), anything),
    "crop_pct": near | numbers | anything,
    "interpolation": st.sampled_from(["nearest", "bilinear", "bicubic", "lanczos", ""]) | anything,
    "resize_mode": st.sampled_from(["squash", "crop", "pad"]) | anything,
    "classes": st.one_of(st.lists(st.text(max_size=4), max_size=3), anything),
}


@st.composite
def edits(draw):
    """One to three fields of a model's config replaced by drawn values (or removed)."""
    chosen = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=3, unique=True))
    return {name: draw(st.one_of(FIELDS[name], st.just(KeyError))) for name in chosen}


@contextmanager
def time_bound(seconds: int):
    def hung(*_):
        raise TimeoutError(f"a case ran past {seconds} s")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _apply(target: dict, edit: dict) -> None:
    for name, value in edit.items():
        node = target if name == "classes" else target["data_config"]
        if value is KeyError:
            node.pop(name, None)
        else:
            node[name] = value


def _outcome(load, image: Path) -> str:
    """'prediction' or 'error'; anything else (another exception, a NaN) fails the test."""
    with time_bound(SECONDS_PER_CASE):
        try:
            clf = load()
            proba = clf.predict_proba([image])
        except HeadstartError as exc:
            msg = error_message(exc)
            assert "\n" not in msg and msg.startswith("error: ")
            return "error"
    assert np.isfinite(proba).all() and math.isclose(float(proba.sum()), 1.0, rel_tol=1e-4), proba
    return "prediction"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzcfg")
    data = make_folder(root / "d", per_class=3, val_per_class=1)
    run = headstart.ImageClassifier(**(FAST | dict(cache=False, epochs=2, patience=2))).fit(data).save(root / "run")
    return root, run, make_image(root / "x.png", (40, 60, 200))


@settings(max_examples=fuzz_examples(150), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edit=edits())
def test_config_json_values_end_in_a_prediction_or_one_line(saved, edit):
    root, run, image = saved
    case = root / "case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(run, case)
    rewrite_config(case, lambda cfg: _apply(cfg, edit))
    _outcome(lambda: headstart.load(case), image)


@pytest.fixture(scope="module")
def exported(saved):
    root, run, image = saved
    return headstart.export.export_onnx_model(headstart.runs.load_model(run)[0], root / "model.onnx")


@settings(max_examples=fuzz_examples(100), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edit=edits())
def test_onnx_metadata_values_end_in_a_prediction_or_one_line(saved, exported, edit):
    import onnx

    root, run, image = saved
    model = onnx.load(str(exported))
    meta = {p.key: p.value for p in model.metadata_props}
    target = {"classes": json.loads(meta["classes"]), "data_config": json.loads(meta["data_config"])}
    _apply(target, edit)
    meta = meta | {key: json.dumps(target[key]) for key in ("classes", "data_config") if key in target}
    if "classes" not in target:
        del meta["classes"]
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    case = root / "case.onnx"
    onnx.save(model, str(case))
    _outcome(lambda: headstart.load(case), image)
