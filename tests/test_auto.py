"""``--auto``: candidates within a time budget, the best kept, a leaderboard in the run."""

from __future__ import annotations

import itertools
import json
import time
import types

import pytest

import dataclasses

from headstart import auto
from headstart.auto import auto_candidates, auto_fit
from headstart.backbones import registry
from headstart.backbones.tiny import TINY
from headstart.cli import main
from headstart.config import AutoConfig, DataConfig
from headstart.data import load_splits
from headstart.errors import ConfigError

from conftest import make_folder

PARAMS = {"backbone": "test_tiny", "epochs": 2, "patience": 1, "progress": False}
CANDIDATES = [("test_tiny", "imagenet"), ("test_tiny", None), ("test_tiny", "imagenet")]


def test_a_tiny_budget_runs_the_first_candidate_and_skips_the_rest(tmp_path, monkeypatch):
    splits = load_splits(make_folder(tmp_path / "data", per_class=5, val_per_class=2))
    # a clock that moves one second each time it is read: the budget is spent by the first candidate on any
    # machine, however fast it trains
    ticks = itertools.count()
    monkeypatch.setattr(auto, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    clf, board = auto_fit(splits, AutoConfig(auto=True, time_budget="0.5s"), PARAMS, cache=tmp_path / "c",
                          candidates=CANDIDATES)
    trained = [r for r in board if r["status"] == "trained"]
    assert len(trained) == 1 and board[0] is trained[0]  # the first always runs
    assert all(r["status"].startswith("skipped") for r in board[1:])  # nothing after the budget
    assert clf.predict(splits.val.paths[0]) in clf.classes_


def test_with_time_every_candidate_runs_and_the_best_score_wins(tmp_path, monkeypatch):
    monkeypatch.setattr(auto, "deeper_unfreeze", lambda *a: None)  # tested below, with the concatenation
    splits = load_splits(make_folder(tmp_path / "data", per_class=5, val_per_class=2))
    clf, board = auto_fit(splits, AutoConfig(auto=True, time_budget="10m"), PARAMS, cache=tmp_path / "c",
                          candidates=CANDIDATES[:2])
    singles = [r for r in board if r["candidate"] in ("test_tiny", "test_tiny (None)")]
    assert [r["status"] for r in singles] == ["trained", "trained"]
    assert board[0]["saved"] and board[0]["score"] >= max(r["score"] for r in singles if not r.get("saved"))
    assert clf.leaderboard_ is board


def test_train_auto_writes_the_leaderboard_into_the_run(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=5, val_per_class=2)
    code = main(["train", str(data), "--out", str(tmp_path / "run"), "--backbone", "test_tiny", "--epochs", "2",
                 "--patience", "1", "--auto", "--time-budget", "1s"])
    assert code in (0, None)
    out = capsys.readouterr().out
    assert "leaderboard" in out and "test_tiny" in out
    board = json.loads((tmp_path / "run" / "leaderboard.json").read_text())
    assert board[0]["candidate"] == "test_tiny" and board[0]["status"] == "trained"
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_the_offline_family_is_offered_cheapest_first():
    names = [n for n, _ in auto_candidates("efficientnet_lite0", "imagenet")]
    assert names == sorted(names) and "efficientnet_lite0" in names
    assert auto_candidates("test_tiny", "imagenet")[0] == ("test_tiny", "imagenet")


@pytest.mark.parametrize("bad", ["soon", "-5m", "0"])
def test_a_budget_that_is_not_a_duration_is_refused(bad):
    with pytest.raises(ConfigError, match="time budget"):
        AutoConfig(auto=True, time_budget=bad)


@pytest.fixture
def two_tiny(monkeypatch) -> list[tuple[str, str]]:
    """Two different tiny backbones (test_tiny, and one at 24 px with its own preprocessing) as candidates."""
    entry = dataclasses.replace(TINY, name="test_tiny_24", data_config=DataConfig(
        input_size=(24, 24), resize_mode="squash", crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    monkeypatch.setitem(registry._REGISTRY, entry.name, entry)
    return [("test_tiny", "imagenet"), ("test_tiny_24", "imagenet")]


def test_with_time_the_best_two_are_concatenated_and_the_best_fine_tuned(tmp_path, two_tiny):
    splits = load_splits(make_folder(tmp_path / "data", per_class=5, val_per_class=2))
    clf, board = auto_fit(splits, AutoConfig(auto=True, time_budget="10m"), PARAMS, cache=tmp_path / "c",
                          candidates=two_tiny)
    rows = {r["candidate"]: r for r in board}
    singles = [rows["test_tiny"], rows["test_tiny_24"]]
    best = max(singles, key=lambda r: r["score"])["candidate"]
    pair = "+".join(sorted((r["candidate"] for r in singles), key=lambda c: -rows[c]["score"]))
    assert rows[pair]["status"] == "trained" and rows[pair]["scored_by"] == singles[0]["scored_by"]
    tuned = rows[f"{best} fine-tuned"]
    assert tuned["status"] == "trained" and tuned["scored_by"] == "validation" and tuned["estimate"] > 0
    saved = board[0]
    assert saved["saved"] and sum(bool(r.get("saved")) for r in board) == 1
    if saved is tuned:  # fine-tuning is kept only when it beats the frozen best on validation
        assert tuned["val_accuracy"] > max(r["val_accuracy"] for r in board if r is not tuned
                                           and r["status"] == "trained")
    assert clf.model_.backbone.name == saved["candidate"].split(" fine-tuned")[0]
    assert not any(k in r for r in board for k in ("backbone", "weights", "width"))
    # then twice as deep (test_tiny fine-tunes 1 of its 3 groups; 2 leaves its stem frozen), under the same rule
    deeper = rows[f"{best} fine-tuned, 2 layer groups"]
    assert deeper["status"] == "trained" and deeper["unfreeze"] == 2 and tuned["unfreeze"] == 1
    if saved is deeper:
        assert deeper["val_accuracy"] > max(r["val_accuracy"] for r in board if r is not deeper
                                            and r["status"] == "trained")
    elif tuned is not saved:
        assert saved["val_accuracy"] >= deeper["val_accuracy"]


def test_the_new_candidates_are_skipped_when_their_estimate_does_not_fit(tmp_path, two_tiny, monkeypatch):
    monkeypatch.setattr(auto, "_finetune_estimate", lambda *a: 1e6)
    splits = load_splits(make_folder(tmp_path / "data", per_class=5, val_per_class=2))
    t0 = time.perf_counter()
    clf, board = auto_fit(splits, AutoConfig(auto=True, time_budget="10m"), PARAMS, cache=tmp_path / "c",
                          candidates=two_tiny)
    assert time.perf_counter() - t0 < 600
    tuned = next(r for r in board if r["candidate"].endswith("fine-tuned"))
    assert tuned["status"].startswith("skipped: estimated 1000000 s")
    assert clf.predict(splits.val.paths[0]) in clf.classes_


def test_a_fine_tuning_estimate_comes_from_a_timed_step(tmp_path):
    splits = load_splits(make_folder(tmp_path / "data", per_class=5, val_per_class=2))
    paths = list(splits.train.paths) + list(splits.val.paths)
    seconds = auto._finetune_estimate("test_tiny", "imagenet", PARAMS, splits, None, auto._digests(paths))
    assert 3.0 < seconds < 120.0


def test_a_fine_tune_that_fits_only_with_one_view_runs_with_one(tmp_path, monkeypatch):
    estimate = auto._finetune_estimate
    monkeypatch.setattr(auto, "_finetune_estimate",
                        lambda name, w, params, *a: estimate(name, w, params, *a) if params.get("views") == 1 else 1e6)
    monkeypatch.setattr(auto, "deeper_unfreeze", lambda *a: None)
    splits = load_splits(make_folder(tmp_path / "data", per_class=5, val_per_class=2))
    clf, board = auto_fit(splits, AutoConfig(auto=True, time_budget="10m"), PARAMS | {"finetune_lr": 1e-4},
                          cache=tmp_path / "c", candidates=CANDIDATES[:1])
    tuned = [r for r in board if "fine-tuned" in r["candidate"]]
    assert [(r["candidate"], r["status"], r["views"]) for r in tuned] == [("test_tiny fine-tuned, 1 view",
                                                                            "trained", 1)]


def test_a_fine_tune_that_fits_only_with_one_view_and_one_rate_runs_so(tmp_path, monkeypatch):
    estimate = auto._finetune_estimate
    monkeypatch.setattr(auto, "_finetune_estimate", lambda name, w, params, *a: estimate(name, w, params, *a)
                        if params.get("finetune_rates") == 1 else 1e6)
    monkeypatch.setattr(auto, "deeper_unfreeze", lambda *a: None)
    splits = load_splits(make_folder(tmp_path / "data", per_class=5, val_per_class=2))
    clf, board = auto_fit(splits, AutoConfig(auto=True, time_budget="10m"), PARAMS, cache=tmp_path / "c",
                          candidates=CANDIDATES[:1])
    tuned = [r for r in board if "fine-tuned" in r["candidate"]]
    assert [(r["candidate"], r["status"], r["views"], r["rates"]) for r in tuned] == [
        ("test_tiny fine-tuned, 1 view, 1 rate", "trained", 1, 1)]


def test_a_concatenation_is_skipped_with_the_reason_when_the_settings_do_not_apply_to_it(tmp_path, two_tiny,
                                                                                          monkeypatch):
    monkeypatch.setattr(auto, "deeper_unfreeze", lambda *a: None)
    splits = load_splits(make_folder(tmp_path / "data", per_class=5, val_per_class=2))
    clf, board = auto_fit(splits, AutoConfig(auto=True, time_budget="10m"), PARAMS | {"input_size": 32},
                          cache=tmp_path / "c", candidates=two_tiny)
    pair = next(r for r in board if "+" in r["candidate"])
    assert pair["status"].startswith("skipped: ") and "leave --input-size out" in pair["status"]
    assert any(r["candidate"].endswith("fine-tuned") and r["status"] == "trained" for r in board)
