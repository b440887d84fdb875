"""End to end on generated images with the tiny backbone: fit, cache, save/load, evaluate, predict, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import headstart
from conftest import FAST, make_image
from headstart.cli import main
from headstart.errors import NotFittedError, RunFormatError


def test_fit_learns_the_classes_and_reports_backbone_passes(image_folder):
    clf = headstart.ImageClassifier(**FAST | {"head": "flatten"}).fit(image_folder)
    assert clf.classes_ == ["blue", "red"]
    assert clf.metrics_["val"]["accuracy"] == 1.0
    assert clf.report_.backbone_passes == {"train": 16, "val": 8}
    # a second training with another head reads every feature from the cache
    again = headstart.ImageClassifier(**FAST | {"head": "avg"}).fit(image_folder)
    assert again.report_.backbone_passes == {"train": 0, "val": 0}
    assert again.report_.from_cache == {"train": 16, "val": 8}


def test_same_seed_same_model(image_folder):
    a = headstart.ImageClassifier(**FAST, seed=7).fit(image_folder)
    b = headstart.ImageClassifier(**FAST, seed=7).fit(image_folder)
    files = sorted((image_folder / "val").glob("*/*.png"))
    assert np.array_equal(a.predict_proba(files), b.predict_proba(files))
    assert [h["val_loss"] for h in a.history_] == [h["val_loss"] for h in b.history_]


def test_unreadable_files_are_skipped_and_listed(image_folder):
    (image_folder / "train" / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    clf = headstart.ImageClassifier(**FAST).fit(image_folder)
    assert [p for p, _ in clf.report_.skipped_unreadable] == [str(image_folder / "train" / "red" / "broken.jpg")]
    assert clf.metrics_["val"]["accuracy"] == 1.0


def test_save_load_round_trip_predicts_the_same(image_folder, tmp_path):
    clf = headstart.ImageClassifier(**FAST).fit(image_folder)
    run = clf.save(tmp_path / "run")
    assert {p.name for p in run.iterdir()} >= {"model.safetensors", "config.json", "metrics.json", "history.csv",
                                               "data.json"}
    assert not list(run.glob("*.pt*")) and not list(run.glob("*.pkl"))
    loaded = headstart.load(run)
    files = sorted((image_folder / "val").glob("*/*.png"))
    assert loaded.classes_ == clf.classes_
    np.testing.assert_allclose(loaded.predict_proba(files), clf.predict_proba(files), atol=1e-6)
    assert loaded.predict(files) == [f.parent.name for f in files]


def test_altered_run_weights_are_refused(image_folder, tmp_path):
    run = headstart.ImageClassifier(**FAST).fit(image_folder).save(tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["backbone"]["weights_digest"] = "0" * 16
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunFormatError, match="config.json is a readable copy and was edited"):
        headstart.load(run)
    cfg["format_version"] = 99
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunFormatError, match="format 99"):
        headstart.load(run)


def test_unfitted_classifier_says_what_to_call():
    with pytest.raises(NotFittedError, match=r"call \.fit"):
        headstart.ImageClassifier().predict(["x.png"])


def test_cli_end_to_end(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--quiet", "train", str(image_folder), "--out", str(run), "--backbone", "test_tiny",
                 "--epochs", "30"]) == 0
    assert "backbone passes: train 16, val 8" in capsys.readouterr().out
    assert main(["evaluate", str(run), str(image_folder / "val"), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == 1.0 and report["confusion_matrix"] == [[4, 0], [0, 4]]
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello")
    good = make_image(tmp_path / "new" / "r.png", (200, 50, 40), seed=99)
    assert main(["predict", str(run), str(tmp_path / "new"), str(bad), "--top-k", "2", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["path"] == str(good) and rows[0]["label"] == "red" and rows[0]["error"] is None
    assert [t["label"] for t in rows[0]["top_k"]] == ["red", "blue"]
    assert rows[1]["label"] is None and "not a readable image" in rows[1]["error"]
    assert main(["predict", str(run), str(good), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(f"{good},red,")


def test_cli_errors_are_one_line_with_exit_1(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Data folder") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        main(["train"])
    assert e.value.code == 2


def test_cli_summary_vgg16(capsys):
    assert main(["summary", "vgg16", "--input-size", "150", "--random", "--frozen"]) == 0
    out = capsys.readouterr().out
    assert "block5_pool (MaxPool2d)" in out and "(None, 512, 4, 4)" in out
    assert "Total params: 14,714,688" in out and "Trainable params: 0 " in out


def test_summary_with_head_counts_head_as_trainable(capsys):
    assert main(["summary", "vgg16", "--input-size", "150", "--random", "--frozen", "--head", "flatten",
                 "--hidden", "256", "--dropout", "0.5"]) == 0
    out = capsys.readouterr().out
    head = 512 * 4 * 4 * 256 + 256 + 256 * 2 + 2
    assert f"Trainable params: {head:,} " in out and f"Total params: {14_714_688 + head:,} " in out
    assert "flatten (Flatten)" in out and "(None, 8192)" in out
