"""The Python API takes what people pass: one path, a folder, a list, PIL images, arrays, bytes, open files; one
result for one image, a list for a list; ``score`` as scikit-learn's classifiers have it; ``fit`` on the CLI's
data layouts."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import headstart
from conftest import make_folder, make_image
from headstart.data.datasets import load_splits
from headstart.errors import ConfigError, ImageReadError

FAST = dict(backbone="test_tiny", epochs=5, engine="torch", cache=False, head_search="off")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("inputs") / "data")


@pytest.fixture(scope="module")
def clf(data):
    return headstart.ImageClassifier(**FAST).fit(data)


def test_one_path_gives_one_label_not_a_list_per_character(clf, data):
    path = data / "val" / "red" / "red_0.png"
    for one in (str(path), path):
        label = clf.predict(one)
        assert label in clf.classes_  # a class name, not ['r', 'e', ...] nor [None, None, ...]
        probs = clf.predict_proba(one)
        assert probs.shape == (len(clf.classes_),) and abs(float(probs.sum()) - 1) < 1e-5
        assert label == clf.classes_[int(probs.argmax())]


def test_a_folder_is_expanded_to_its_images_as_the_cli_does(clf, data):
    folder = data / "val"
    images = sorted(folder.rglob("*.png"))
    by_folder = clf.predict(str(folder))
    assert isinstance(by_folder, list) and len(by_folder) == len(images) and None not in by_folder
    assert by_folder == clf.predict([str(p) for p in images])
    assert clf.predict([folder, images[0]]) == by_folder + [by_folder[0]]  # a list may mix folders and files
    assert clf.predict_proba(folder).shape == (len(images), len(clf.classes_))


def test_pictures_arrays_bytes_and_open_files_are_images(clf, data):
    path = data / "val" / "blue" / "blue_1.png"
    expected = clf.predict_proba(path)
    picture = Image.open(path)
    pixels = np.asarray(picture.convert("RGB"))
    with open(path, "rb") as f:
        from_file = clf.predict_proba(f)
    for one in (picture, pixels, path.read_bytes(), io.BytesIO(path.read_bytes())):
        np.testing.assert_allclose(clf.predict_proba(one), expected, atol=1e-5)
    np.testing.assert_allclose(from_file, expected, atol=1e-5)
    batch = np.stack([pixels, pixels[::-1]])  # (N, H, W, 3): several images
    assert clf.predict_proba(batch).shape == (2, len(clf.classes_))
    assert clf.predict([picture, path.read_bytes(), pixels]) == [clf.predict(path)] * 3


def test_one_unreadable_image_raises_its_reason_and_a_list_gets_none(clf, data, tmp_path):
    with pytest.raises(ImageReadError, match="nosuch.jpg: does not exist"):
        clf.predict(str(tmp_path / "nosuch.jpg"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="broken.png"):
        clf.predict_proba(broken)
    good = data / "val" / "red" / "red_0.png"
    labels = clf.predict([broken, good])
    assert labels[0] is None and labels[1] == clf.predict(good)
    assert np.isnan(clf.predict_proba([broken, good])[0]).all()


def test_what_is_no_image_is_a_clear_error(clf):
    for wrong, says in ((5, "got int"), (None, "got NoneType"), ({"a": 1}, "got dict"),
                        (torch.zeros(3, 8, 8), "torch Tensor")):
        with pytest.raises(ConfigError, match=says):
            clf.predict(wrong)


def test_score_is_accuracy_on_labelled_data_or_against_labels(clf, data):
    accuracy = clf.evaluate(data / "val")["accuracy"]
    assert clf.score(data / "val") == accuracy
    images = sorted((data / "val").rglob("*.png"))
    truth = [p.parent.name for p in images]
    assert clf.score(images, truth) == accuracy
    assert clf.score(images[0], truth[0]) in (0.0, 1.0)
    with pytest.raises(ConfigError, match="not classes of this model"):
        clf.score(images, ["green"] * len(images))
    with pytest.raises(ConfigError, match="label"):
        clf.score(images, truth[:-1])


def test_fit_takes_the_layouts_the_cli_takes(tmp_path):
    tree = make_folder(tmp_path / "tree", per_class=6, val_per_class=3)
    make_folder(tmp_path / "tree_test", per_class=3, val_per_class=0)
    (tree / "test").symlink_to(tmp_path / "tree_test" / "train")
    clf = headstart.ImageClassifier(**FAST).fit(tree)  # train/, val/ and test/ found by name
    assert clf.report_.val_counts == {"blue": 3, "red": 3} and clf.metrics_["test"]["n"] == 6

    flat = tree / "train"  # a folder of class folders: validation held out
    clf = headstart.ImageClassifier(**FAST).fit(flat)
    assert "held out" in clf.report_.split

    rows = tmp_path / "labels.csv"
    with open(rows, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for p in sorted(flat.rglob("*.png")):
            w.writerow([p.relative_to(tmp_path), p.parent.name])
    clf = headstart.ImageClassifier(**FAST).fit(rows, val=tree / "val")
    assert clf.classes_ == ["blue", "red"] and clf.report_.val_counts == {"blue": 3, "red": 3}

    splits = load_splits(tree)  # what the CLI scans before the model libraries load
    assert headstart.ImageClassifier(**FAST).fit(splits).classes_ == ["blue", "red"]
    with pytest.raises(ConfigError, match="Splits"):
        headstart.ImageClassifier(**FAST).fit(splits, val=tree / "val")


def test_an_empty_folder_gives_an_empty_result(clf, tmp_path):
    (tmp_path / "empty").mkdir()
    assert clf.predict(tmp_path / "empty") == []
    assert clf.predict_proba(tmp_path / "empty").shape == (0, len(clf.classes_))


def test_one_image_from_make_image_is_one_result(clf, tmp_path):
    path = make_image(tmp_path / "x.jpg", (200, 50, 40), fmt="JPEG")
    assert isinstance(clf.predict(path), str)
