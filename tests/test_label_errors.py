"""Likely label errors and near-duplicates across classes: found from features, reported by train and check,
left out by --exclude; a failure of the search never costs the trained model."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

import headstart
from headstart.cli import main
from headstart.errors import DatasetError
from headstart.label_errors import DUPLICATE_SIMILARITY, find_label_errors

from conftest import FAST, FAST_CLI, make_folder


def _blobs(n_per_class=40, dim=16, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (3, dim)) * spread
    labels = np.repeat(np.arange(3), n_per_class)
    x = centres[labels] + rng.normal(0, 1, (len(labels), dim))
    return x.astype(np.float32), labels


def test_flipped_labels_rank_first_and_cleanlab_sets_the_count():
    x, labels = _blobs()
    noisy = labels.copy()
    flipped = [3, 50, 97, 110]
    for i in flipped:
        noisy[i] = (labels[i] + 1) % 3
    paths = [f"img{i}.png" for i in range(len(x))]
    found = find_label_errors(x, noisy, ["a", "b", "c"], paths)
    assert sorted(np.argsort(found.quality)[:4].tolist()) == flipped  # ranked first
    # how many are flagged is cleanlab's estimate (no constant): on clean blobs, no false alarm
    assert 1 <= len(found.suspects) <= 4 and {int(s["path"][3:-4]) for s in found.suspects} <= set(flipped)
    first = found.suspects[0]
    assert first["rank"] == 1 and first["suggested"] == "abc"[labels[int(first["path"][3:-4])]]
    assert first["quality"] == min(s["quality"] for s in found.suspects) < 0.5
    assert 0.9 < found.agreement <= 116 / 120  # the check's head predicts the true class of the flipped ones
    assert len(found.quality) == len(x) and found.seconds > 0


def test_a_copy_filed_under_another_class_is_a_near_duplicate():
    x, labels = _blobs(spread=1.0)  # photos of one class are not near-duplicates of each other either
    x = np.vstack([x, x[5] * 1.01 + 0.01])  # image 5 (class a), again, slightly altered, as class c
    labels = np.append(labels, 2)
    paths = [f"img{i}.png" for i in range(len(x))]
    found = find_label_errors(x, labels, ["a", "b", "c"], paths)
    assert find_label_errors(x[:-1], labels[:-1], ["a", "b", "c"], paths[:-1]).duplicates == []
    [pair] = found.duplicates
    assert {pair["a"], pair["b"]} == {"img5.png", f"img{len(x) - 1}.png"} and pair["labels"] == ["a", "c"]
    assert pair["similarity"] >= DUPLICATE_SIMILARITY


def test_on_data_whose_images_all_look_alike_only_a_copy_is_a_near_duplicate():
    # the images vary along 3 directions only (as small scans of digits do for an ImageNet backbone): hundreds of
    # different images in different classes score over DUPLICATE_SIMILARITY, as alike as class-mates are
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    low = rng.normal(0, 1, (3, 3))[labels] * 0.8 + rng.normal(0, 1, (120, 3))
    x = np.hstack([low, rng.normal(0, 0.05, (120, 13))]).astype(np.float32)
    z = (x - x.mean(0)) / np.linalg.norm(x - x.mean(0), axis=1, keepdims=True)
    alike = np.triu((z @ z.T >= DUPLICATE_SIMILARITY) & (labels[:, None] != labels[None, :]), 1)
    assert alike.sum() > 100
    paths = [f"img{i}.png" for i in range(121)]
    assert find_label_errors(x, labels, ["a", "b", "c"], paths[:-1]).duplicates == []
    copy = np.vstack([x, x[5] * 1.02 + 0.01])  # image 5 (class a), slightly altered, filed as class c
    [pair] = find_label_errors(copy, np.append(labels, 2), ["a", "b", "c"], paths).duplicates
    assert {pair["a"], pair["b"]} == {"img5.png", "img120.png"}


def test_bad_input_is_one_clear_line():
    x, labels = _blobs(n_per_class=3)
    with pytest.raises(DatasetError, match="9 feature rows, 9 labels and 2 paths"):
        find_label_errors(x, labels, ["a", "b", "c"], ["p", "q"])
    with pytest.raises(DatasetError, match="at least 2 classes with 2 images each.*\\[3, 3, 1\\]"):
        find_label_errors(x[:7], labels[:7], ["a", "b", "c"], [str(i) for i in range(7)])


@pytest.fixture(scope="module")
def mislabelled(tmp_path_factory):
    """Three colour classes of 12 training images, two of the red ones filed under blue."""
    root = make_folder(tmp_path_factory.mktemp("labels") / "data", classes=("blue", "red", "green"), per_class=12,
                       val_per_class=3)
    moved = []
    for i in (0, 1):
        src = root / "train" / "red" / f"red_{i}.png"
        dst = root / "train" / "blue" / f"red_{i}.png"
        shutil.move(src, dst)
        moved.append(str(dst))
    return root, moved


def test_train_lists_the_mislabelled_images_first_and_keeps_them(mislabelled, tmp_path, capsys):
    root, moved = mislabelled
    assert main(["train", str(root), "--out", str(tmp_path / "run"), *FAST_CLI]) == 0
    out = capsys.readouterr().out
    assert "look mislabelled" in out and "labelled blue, looks like red" in out
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    listed = [e["path"] for e in data["label_errors"]]
    assert listed and set(listed) <= set(moved) and data["label_errors"][0]["rank"] == 1
    assert data["train_counts"]["blue"] == 14  # nothing is removed
    assert data["seconds"]["label_errors"] > 0
    # how far to trust the list: the share of given labels the check's own head predicts, said in the warning
    agreement = data["label_check_agreement"]
    assert 0.5 < agreement <= 34 / 36 and f"to a check that predicts {agreement:.0%} of the given labels" in out


def test_exclude_leaves_the_listed_images_out(mislabelled, tmp_path):
    root, moved = mislabelled
    listing = tmp_path / "wrong.txt"
    listing.write_text(f"# looked at them\n{moved[0]}\n{moved[1]}   # another\nnot/an/image.png\n\n")
    assert main(["--quiet", "train", str(root), "--out", str(tmp_path / "run"), "--exclude", str(listing),
                 *FAST_CLI]) == 0
    data = json.loads((tmp_path / "run" / "data.json").read_text())
    assert data["train_counts"]["blue"] == 12 and sorted(data["excluded"]) == sorted(moved)
    assert data["exclude_unmatched"] == ["not/an/image.png"]
    assert not {e["path"] for e in data["label_errors"]} & set(moved)
    assert main(["--quiet", "train", str(root), "--out", str(tmp_path / "run2"), "--exclude",
                 str(tmp_path / "missing.txt"), *FAST_CLI]) == 1


def test_check_prints_the_table_without_saving_a_model(mislabelled, tmp_path, capsys, monkeypatch):
    root, moved = mislabelled
    monkeypatch.chdir(tmp_path)
    assert main(["--quiet", "check", str(root), "--backbone", "test_tiny"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("likely label errors"):out.index("\n\n", out.index("likely label errors"))].splitlines()
    assert len(table) > 2 and {line.split()[1] for line in table[2:]} <= set(moved)
    assert all(line.split()[2:4] == ["blue", "red"] for line in table[2:])
    assert "45 images in 3 classes" in out  # train and val, checked as one set
    assert [p.name for p in tmp_path.iterdir()] == ["feature-cache"]  # features kept; no model, no run folder
    assert main(["--quiet", "check", str(root), "--backbone", "test_tiny", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["label_errors"] and {e["path"] for e in report["label_errors"]} <= set(moved)
    assert main(["check", str(tmp_path / "nothing-here"), "--backbone", "test_tiny"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")


def test_a_failing_search_is_a_warning_and_the_model_is_kept(mislabelled, monkeypatch, caplog, tmp_path):
    root, _ = mislabelled

    def broken(*args, **kwargs):
        raise RuntimeError("cleanlab fell over")

    monkeypatch.setattr("headstart.api.find_label_errors", broken)
    with caplog.at_level(logging.WARNING, logger="headstart"):
        clf = headstart.ImageClassifier(**dict(FAST, epochs=3), progress=False).fit(root)
    assert "label-error check did not run (RuntimeError: cleanlab fell over)" in caplog.text
    assert clf.report_.label_errors == [] and clf.predict(root / "val" / "red" / "red_0.png") in clf.classes_
    clf.save(tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").exists()
