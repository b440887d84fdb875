"""Suspect images (placeholders, blank frames, repeated or twice-labelled files) are flagged and listed in the
run, never dropped; legitimate grayscale data (the demo's digits) raises no flag."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import headstart
from conftest import FAST, FAST_CLI, HYMENOPTERA, make_folder, needs_shared
from headstart.cli import main
from headstart.data import load_splits
from headstart.data.suspects import find_suspects
from headstart.demo import write_digits
from headstart.features import file_digest


def _placeholder(path: Path) -> Path:
    """A grey "this image could not be found" picture, like the GIF in hymenoptera."""
    im = Image.new("RGB", (300, 300), (214, 214, 214))
    d = ImageDraw.Draw(im)
    d.rectangle((120, 80, 180, 130), outline=(150, 150, 150), width=3)
    d.text((60, 170), "We're sorry, this image", fill=(90, 90, 90))
    d.text((70, 190), "could not be found.", fill=(90, 90, 90))
    im.save(path)
    return path


def _suspects_of(ds_root: Path) -> list[dict]:
    s = load_splits(ds_root)
    return [row for ds in (s.train, s.val) if ds is not None
            for row in find_suspects(ds.paths, ds.labels.tolist(), ds.classes, [file_digest(p) for p in ds.paths])]


@pytest.fixture
def suspect_folder(tmp_path) -> Path:
    root = make_folder(tmp_path / "d", per_class=6, val_per_class=2)
    train = root / "train"
    _placeholder(train / "blue" / "imageNotFound.gif")
    Image.new("RGB", (120, 90), (3, 3, 3)).save(train / "red" / "black-frame.jpg")
    shutil.copy(train / "red" / "red_0.png", train / "red" / "red_0 copy.png")
    shutil.copy(train / "blue" / "blue_1.png", train / "red" / "looks-blue.png")
    return root


def test_suspects_are_flagged_listed_and_kept(suspect_folder, tmp_path):
    clf = headstart.ImageClassifier(**FAST, cache=tmp_path / "c").fit(suspect_folder)
    rows = {Path(r["path"]).name: r for r in clf.report_.suspect_images}
    assert set(rows) == {"imageNotFound.gif", "black-frame.jpg", "red_0.png", "red_0 copy.png", "blue_1.png",
                         "looks-blue.png"}
    assert "placeholder" in rows["imageNotFound.gif"]["reason"] and rows["imageNotFound.gif"]["class"] == "blue"
    assert "flat tone" in rows["black-frame.jpg"]["reason"]
    assert "appears 2 times in class 'red'" in rows["red_0 copy.png"]["reason"]
    assert "also labelled ['red']" in rows["blue_1.png"]["reason"]
    assert "also labelled ['blue']" in rows["looks-blue.png"]["reason"]
    # kept: every file went into training (6 + 1 blue, 6 + 3 red), nothing skipped
    assert clf.report_.skipped_unreadable == []
    assert sum(clf.report_.backbone_passes.values()) + sum(clf.report_.from_cache.values()) == 16 + 4
    run = clf.save(tmp_path / "run")
    assert json.loads((run / "data.json").read_text())["suspect_images"] == clf.report_.suspect_images


def test_suspects_reach_the_cli(suspect_folder, tmp_path, capsys):
    assert main(["--quiet", "train", str(suspect_folder), "--out", str(tmp_path / "run"), *FAST_CLI]) == 0
    out = capsys.readouterr().out
    assert "warning: 6 suspect image(s) kept in the data" in out and "imageNotFound.gif: a grey picture" in out


def test_the_demo_digits_raise_no_flag(tmp_path):
    """800 grayscale digits, mostly black: grey and dark is what they are, not a sign of a placeholder."""
    root = write_digits(tmp_path / "digits")
    assert _suspects_of(root) == []
    small = write_digits(tmp_path / "small", per_class=4, val_per_class=2)
    clf = headstart.ImageClassifier(**FAST, cache=False).fit(small)
    assert clf.report_.suspect_images == []


def test_a_blank_frame_among_grayscale_digits_is_still_flagged(tmp_path):
    root = write_digits(tmp_path / "digits", per_class=10, val_per_class=2)
    Image.new("L", (64, 64), 0).save(root / "train" / "3" / "empty-scan.png")
    assert [Path(r["path"]).name for r in _suspects_of(root)] == ["empty-scan.png"]


@pytest.mark.slow
@needs_shared(HYMENOPTERA)
def test_hymenoptera_placeholder_is_the_one_suspect():
    rows = _suspects_of(HYMENOPTERA)
    assert [(Path(r["path"]).name, r["class"]) for r in rows] == [("imageNotFound.gif", "ants")]


def test_train_val_duplicates_are_found_without_a_cache(tmp_path):
    root = make_folder(tmp_path / "d", per_class=3, val_per_class=1)
    shutil.copy(root / "train" / "red" / "red_2.png", root / "val" / "red" / "again.png")
    clf = headstart.ImageClassifier(**FAST, cache=False).fit(root)
    assert [[Path(a).name, Path(b).name] for a, b in clf.report_.train_val_duplicates] == [["red_2.png",
                                                                                               "again.png"]]
