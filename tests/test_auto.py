"""``--auto``: candidates within a time budget, the best kept, a leaderboard in the run."""

from __future__ import annotations

import json
import time

import pytest

from headstart.auto import auto_candidates, auto_fit
from headstart.cli import main
from headstart.config import AutoConfig
from headstart.data import load_splits
from headstart.errors import ConfigError

from conftest import make_folder

PARAMS = {"backbone": "test_tiny", "epochs": 2, "patience": 1, "progress": False}
CANDIDATES = [("test_tiny", "imagenet"), ("test_tiny", None), ("test_tiny", "imagenet")]


def test_a_tiny_budget_runs_the_first_candidate_and_skips_the_rest(tmp_path):
    splits = load_splits(make_folder(tmp_path / "data", per_class=5, val_per_class=2))
    t0 = time.perf_counter()
    clf, board = auto_fit(splits, AutoConfig(auto=True, time_budget="0.5s"), PARAMS, cache=tmp_path / "c",
                          candidates=CANDIDATES)
    elapsed = time.perf_counter() - t0
    trained = [r for r in board if r["status"] == "trained"]
    assert len(trained) == 1 and all(r["status"].startswith("skipped") for r in board[1:])
    assert elapsed < 0.5 + trained[0]["seconds"] + 1.0  # the first always runs; nothing after the budget
    assert clf.predict(splits.val.paths[0]) in clf.classes_


def test_with_time_every_candidate_runs_and_the_best_score_wins(tmp_path):
    splits = load_splits(make_folder(tmp_path / "data", per_class=5, val_per_class=2))
    clf, board = auto_fit(splits, AutoConfig(auto=True, time_budget="10m"), PARAMS, cache=tmp_path / "c",
                          candidates=CANDIDATES[:2])
    assert [r["status"] for r in board] == ["trained", "trained"]
    assert board[0]["score"] >= board[1]["score"]
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
