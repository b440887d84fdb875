"""The learning-rate range test: a finite suggestion inside the tested range, a plot, weights left unchanged,
and fine-tuning that takes the suggestion when no --finetune-lr is given (and the given one when it is)."""

from __future__ import annotations

import math

import numpy as np

import torch
from PIL import Image

import headstart
from headstart.cli import main
from headstart.training.lr_find import plot, range_test

from conftest import FAST, make_folder


def _toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, 0] > 0).long()
    return x, y


def test_the_range_test_suggests_a_finite_rate_and_restores_the_weights(tmp_path):
    x, y = _toy()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = range_test(model, [{"params": list(model.parameters()), "lr": 1.0}], [x], y, steps=60)
    assert math.isfinite(found.suggestion) and found.lrs[0] <= found.suggestion <= found.lrs[-1]
    assert found.losses[0] > min(found.losses)  # the loss came down somewhere on the way
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    png = plot(found, tmp_path / "lr.png")
    assert Image.open(png).size[0] > 100


def test_lr_find_command_prints_a_suggestion_and_writes_the_plot(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=6, val_per_class=2)
    assert main(["lr-find", str(data), "--backbone", "test_tiny", "--epochs", "3", "--out",
                 str(tmp_path / "lr.png")]) in (0, None)
    out = capsys.readouterr().out
    assert "suggestion" in out and (tmp_path / "lr.png").is_file()


def test_finetune_uses_the_range_test_unless_a_rate_is_given(tmp_path):
    data = make_folder(tmp_path / "data", per_class=6, val_per_class=2)
    settings = FAST | {"epochs": 3, "strategy": "finetune", "finetune_epochs": 1, "views": 1, "progress": False,
                       "finetune_lr": None}
    found = headstart.ImageClassifier(**settings).fit(data / "train", val=data / "val").report_.lr_find
    assert found is not None and math.isfinite(found["used"]) and found["used"] > 0
    given = headstart.ImageClassifier(**settings | {"finetune_lr": 3e-4}).fit(data / "train", val=data / "val")
    assert given.report_.lr_find is None


def test_a_flat_curve_suggests_a_tenth_of_where_it_starts_to_rise_never_below_the_sweep():
    # a head trained beforehand: the loss is flat, its minimum sits at the first rate by chance, then it blows up
    from headstart.training.lr_find import LrFind, _suggest

    lrs = list(np.logspace(-7, -1, 61))
    losses = [0.010 - 1e-6 * i for i in range(3)] + [0.010] * 37 + [0.010 * 1.3 ** k for k in range(1, 22)]
    found = LrFind(lrs=lrs, losses=losses)
    _suggest(found)
    rise = lrs[39]  # the last rate of the flat stretch
    assert found.suggestion >= lrs[0]
    assert np.isclose(found.suggestion, rise / 10)
    assert np.isclose(found.edge, lrs[41])  # the last rate before the loss passes twice its minimum (0.010 * 1.3**3)


def test_a_curve_still_falling_when_the_sweep_ends_gets_a_suggestion():
    # rising until the sweep's last five steps (which the steepest-descent rule does not read), then falling to
    # its minimum there: no descent to take a rate from, and no flat stretch at the minimum's level before it
    from headstart.training.lr_find import LrFind, _suggest

    lrs = list(np.logspace(-7, -1, 30))
    losses = [1.0 + 0.001 * i * i for i in range(25)] + [0.8, 0.6, 0.4, 0.3, 0.2]
    found = LrFind(lrs=lrs, losses=losses)
    _suggest(found)
    assert lrs[0] <= found.suggestion <= lrs[-1] and np.isfinite(found.edge)


def test_without_a_given_rate_fine_tuning_tries_rates_above_the_suggestion_and_keeps_the_best_on_val(tmp_path):
    data = make_folder(tmp_path / "data", per_class=6, val_per_class=3)
    settings = FAST | {"epochs": 3, "strategy": "finetune", "finetune_epochs": 2, "views": 1, "progress": False,
                       "finetune_lr": None}
    clf = headstart.ImageClassifier(**settings).fit(data / "train", val=data / "val")
    found = clf.report_.lr_find
    rates = [t["lr"] for t in found["tried"]]
    top = found["edge"] if found["edge"] > found["suggestion"] else 10 * found["suggestion"]
    assert np.allclose(rates, np.geomspace(found["suggestion"], top, 3))  # from the suggestion up to the climb
    replaced = [t for t in found["tried"] if t["replaced_head"]]
    assert replaced, found["tried"]  # a head of three epochs leaves fine-tuning room to win
    # the saved model is the best of the rates on validation, and its rate is the one recorded
    best = max(replaced, key=lambda t: (t["val_accuracy"], -t["val_loss"]))
    assert found["used"] == best["lr"] and clf.metrics_["val"]["accuracy"] == best["val_accuracy"]
    one = headstart.ImageClassifier(**settings | {"finetune_rates": 1}).fit(data / "train", val=data / "val")
    assert one.report_.lr_find["tried"] is None and one.report_.lr_find["used"] == one.report_.lr_find["suggestion"]


def test_the_rate_kept_is_the_most_accurate_on_val_then_the_lowest_loss_and_its_weights_are_the_ones_left(
        monkeypatch):
    from headstart.training import recipes

    reached = {1.0: (0.80, 0.30), 2.0: (0.90, 0.50), 3.0: (0.90, 0.40), 4.0: None}  # None: the head stage kept
    upper, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def fake_finetune(*args, lr, checkpoint_name, **kw):
        assert float(upper.weight.detach().sum()) == 0  # every rate starts from the head stage's weights
        score = reached[lr]
        if score is not None:
            with torch.no_grad():
                upper.weight.fill_(lr)
        return [{"epoch": 5, "best": score is not None, "val_accuracy": score[0] if score else 0.5,
                 "val_loss": score[1] if score else 1.0, "checkpoint": checkpoint_name}]

    monkeypatch.setattr(recipes, "_finetune", fake_finetune)
    with torch.no_grad():
        upper.weight.zero_()
    args = (None, None, upper, head, None, None, None, None, [], None, False, False, None, None)
    stage2, lr, tried = recipes._finetune_at(list(reached), *args)
    assert lr == 3.0 and float(upper.weight.detach()[0, 0]) == 3.0 and stage2[0]["val_accuracy"] == 0.90
    assert [t["replaced_head"] for t in tried] == [True, True, True, False]
    assert stage2[0]["checkpoint"] == "finetune-3.safetensors"  # each rate has a checkpoint of its own
    with torch.no_grad():
        upper.weight.zero_()
    reached.update({1.0: None, 2.0: None, 3.0: None})
    stage2, lr, tried = recipes._finetune_at([1.0, 2.0, 3.0], *args)
    # no rate won: the head stage's weights are left
    assert float(upper.weight.detach().abs().sum()) == 0 and not any(r["best"] for r in stage2)
