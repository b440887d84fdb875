"""The bad-input suite: dirty files generated on the fly, each with its outcome asserted.

Outcomes: *skipped and reported* (the run goes on; the file is listed in the report and data.json),
*converted* (trained on as an RGB picture), or a *clear error* (``DatasetError`` before any work).
One small training over a folder holding all of them is shared by the tests of this module.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import headstart
from conftest import FAST, FAST_CLI, make_folder, make_image, png_header
from headstart.cli import main
from headstart.data import load_image, load_splits
from headstart.errors import DatasetError, ImageReadError

BLUE = (40, 60, 200)


def _noisy(colour, size=(40, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(colour, dtype=np.float32) + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255)
    return Image.fromarray(a.astype(np.uint8))


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _exif_rotated(upright: Image.Image, path: Path) -> Path:
    """Store ``upright`` turned on its side, with the EXIF tag (6) that tells viewers to turn it back."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored pixels are the upright picture turned CCW
    upright.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", exif=exif, quality=100, subsampling=0)
    return path


# name -> (writer, outcome); every writer puts one file into train/blue
def _write_bad_files(cls: Path) -> dict[str, str]:
    outcomes = {}

    def add(name, outcome, data=None, image=None, **save_kw):
        p = cls / name
        if data is not None:
            p.write_bytes(data)
        elif image is not None:
            image.save(p, **save_kw)
        outcomes[name] = outcome

    photo = _noisy(BLUE, (64, 48), seed=1)
    add("zero-byte.jpg", "skipped", b"")
    add("truncated.jpg", "skipped", _jpeg_bytes(_noisy(BLUE, (200, 200)))[:1500])
    add("page.jpg", "skipped", b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    add("text.jpg", "skipped", b"this is not a picture\n" * 20)
    (cls / "bomb.png").write_bytes(png_header(20000, 20000, bits=1, colour=0))  # over Pillow's bomb limit
    outcomes["bomb.png"] = "skipped"
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    add("alpha.png", "converted", image=rgba)
    add("palette.png", "converted", image=photo.convert("P"))
    gray16 = Image.fromarray((np.linspace(0, 60000, 48 * 64).reshape(48, 64)).astype(np.uint16))
    add("gray16.png", "converted", image=gray16)
    add("cmyk.jpg", "converted", image=photo.convert("CMYK"))
    frames = [photo.convert("P"), _noisy((200, 50, 40), (64, 48)).convert("P")]
    frames[0].save(cls / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    outcomes["animated.gif"] = "converted"
    _exif_rotated(photo, cls / "exif-rotated.jpg")
    outcomes["exif-rotated.jpg"] = "converted"
    add("png-named.jpg", "converted", image=photo, format="PNG")  # Oxford-Pets style: a PNG called .jpg
    add("one-pixel.png", "converted", image=Image.new("RGB", (1, 1), BLUE))
    add("strip.png", "converted", image=_noisy(BLUE, (20000, 20), seed=2))
    add("UPPER.JPG", "converted", image=photo, format="JPEG")
    for name in ("with space.png", "ünïcødé 图片.png", "-dash.png", "--help.png"):
        add(name, "converted", image=_noisy(BLUE, seed=sum(map(ord, name))))
    return outcomes


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """A dirty train/val tree, trained on once; returns (data root, outcomes, classifier, run folder)."""
    root = make_folder(tmp_path_factory.mktemp("dirty") / "data")
    outcomes = _write_bad_files(root / "train" / "blue")
    red = root / "train" / "red"
    os.symlink(".", red / "loop")                           # a symlink loop
    os.symlink(red / "nowhere.png", red / "dangling.png")   # a broken link
    (red / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    make_image(red / "__MACOSX" / "._red_0.png", (0, 0, 0))
    make_image(red / ".ipynb_checkpoints" / "red_0-checkpoint.png", (0, 0, 0))
    make_image(root / "train" / ".ipynb_checkpoints" / "stray.png", (0, 0, 0))  # hidden folder at class level
    (root / "train" / "__MACOSX").mkdir()
    # the same picture in train and val, under another name
    (root / "val" / "blue" / "copy-of-blue_0.png").write_bytes((root / "train" / "blue" / "blue_0.png").read_bytes())
    cache = tmp_path_factory.mktemp("cache")
    clf = headstart.ImageClassifier(**FAST, cache=cache).fit(root)
    run = clf.save(tmp_path_factory.mktemp("runs") / "run")
    return root, outcomes, clf, run


def _skipped(clf) -> dict[str, str]:
    return {Path(p).name: reason for p, reason in clf.report_.skipped_unreadable}


SKIPPED = {"zero-byte.jpg": "empty file", "truncated.jpg": "truncated", "page.jpg": "not a readable image",
           "text.jpg": "not a readable image", "bomb.png": "too large to decode safely"}


@pytest.mark.parametrize("name,reason", sorted(SKIPPED.items()))
def test_unreadable_file_is_skipped_and_reported(dirty, name, reason):
    root, outcomes, clf, run = dirty
    assert outcomes[name] == "skipped"
    assert reason in _skipped(clf)[name]
    listed = {Path(p).name for p, _ in json.loads((run / "data.json").read_text())["skipped_unreadable"]}
    assert name in listed


def test_the_run_goes_on_and_learns_despite_the_dirt(dirty):
    root, outcomes, clf, run = dirty
    assert set(_skipped(clf)) == set(SKIPPED)  # nothing else was dropped
    converted = [n for n, o in outcomes.items() if o == "converted"]
    # every convertible file was used: 8 blue + converted, 8 red; in val 4 + 4 through the backbone and
    # the copy of a train image from the cache (same content, same features)
    assert clf.report_.backbone_passes == {"train": 8 + len(converted) + 8, "val": 8}
    assert clf.report_.from_cache == {"train": 0, "val": 1}
    assert clf.metrics_["val"]["accuracy"] == 1.0
    assert clf.classes_ == ["blue", "red"]  # no hidden folder became a class


@pytest.mark.parametrize("name", ["alpha.png", "palette.png", "gray16.png", "cmyk.jpg", "animated.gif",
                                  "png-named.jpg", "one-pixel.png", "strip.png", "UPPER.JPG"])
def test_odd_but_valid_images_are_converted_to_rgb(dirty, name):
    root, *_ = dirty
    im = load_image(root / "train" / "blue" / name)
    assert im.mode == "RGB"
    a = np.asarray(im, dtype=np.float32)
    if name == "alpha.png":  # transparent pixels are composited on white, not black
        assert a[0].mean() > 240 and a[-1, :, 2].mean() > a[-1, :, 0].mean() + 60  # alpha 0 at the top
    elif name == "gray16.png":  # the 16-bit range is scaled, not clipped to white
        assert a[0].mean() < 10 and a[-1].mean() > 245  # 0 at the top, 60000 at the bottom
    elif name == "animated.gif":  # the first frame (blue), not the second (red)
        assert a[..., 2].mean() > a[..., 0].mean() + 60
    elif name in ("cmyk.jpg", "palette.png", "one-pixel.png", "UPPER.JPG", "png-named.jpg"):
        assert a[..., 2].mean() > a[..., 0].mean() + 60  # still blue
    elif name == "strip.png":
        assert im.size == (20000, 20)


def test_exif_rotated_jpeg_is_predicted_like_the_upright_photo(dirty, tmp_path):
    root, outcomes, clf, run = dirty
    upright = Image.new("RGB", (32, 64), (200, 50, 40))
    upright.paste((40, 60, 200), (0, 32, 32, 64))  # top red, bottom blue: orientation matters
    upright.save(tmp_path / "upright.png")
    _exif_rotated(upright, tmp_path / "phone.jpg")
    raw = upright.transpose(Image.Transpose.ROTATE_90)
    raw.save(tmp_path / "no-exif.png")  # what a reader that ignores EXIF would see
    assert load_image(tmp_path / "phone.jpg").size == (32, 64)
    probs = clf.predict_proba([tmp_path / "upright.png", tmp_path / "phone.jpg", tmp_path / "no-exif.png"])
    assert clf.predict([tmp_path / "upright.png"]) == clf.predict([tmp_path / "phone.jpg"])
    np.testing.assert_allclose(probs[1], probs[0], atol=0.02)
    feats = headstart.features.extract_features(clf.model_.backbone, [tmp_path / "upright.png",
                                                                      tmp_path / "phone.jpg",
                                                                      tmp_path / "no-exif.png"]).features
    near, far = (feats[1] - feats[0]).abs().mean(), (feats[2] - feats[0]).abs().mean()
    assert near < far / 5  # the EXIF-rotated file is seen upright, not sideways


def test_odd_file_names_are_trained_on(dirty):
    root, outcomes, clf, run = dirty
    data = json.loads((run / "data.json").read_text())
    assert data["train_counts"]["blue"] == 8 + len(outcomes)
    for name in ("with space.png", "ünïcødé 图片.png", "-dash.png", "--help.png"):
        assert name not in _skipped(clf)


@pytest.mark.parametrize("how", ["after --", "as ./"])
def test_cli_predicts_file_names_with_leading_dashes(dirty, capsys, monkeypatch, how):
    root, outcomes, clf, run = dirty
    monkeypatch.chdir(root / "train" / "blue")
    names = ["-dash.png", "--help.png", "with space.png", "ünïcødé 图片.png"]
    args = ["--", *names] if how == "after --" else [f"./{n}" for n in names]
    assert main(["--quiet", "predict", str(run), "--format", "json", *args]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [Path(r["path"]).name for r in rows] == names
    assert all(r["error"] is None and r["label"] == "blue" for r in rows)


def test_symlink_loop_and_broken_link_are_reported_not_followed(dirty):
    root, outcomes, clf, run = dirty
    ignored = json.loads((run / "data.json").read_text())["ignored"]
    assert any(p.endswith("loop") and "symlink loop" in r for p, r in ignored)
    assert any(p.endswith("dangling.png") and "broken link" in r for p, r in ignored)
    assert clf.report_.train_counts["red"] == 8  # each red image counted once


def test_hidden_files_and_folders_are_passed_over(dirty):
    root, outcomes, clf, run = dirty
    data = json.loads((run / "data.json").read_text())
    mentioned = json.dumps(data["ignored"]) + json.dumps(data["skipped_unreadable"])
    for junk in (".DS_Store", "__MACOSX", ".ipynb_checkpoints"):
        assert junk not in mentioned
    assert data["classes"] == ["blue", "red"] and data["train_counts"]["red"] == 8


def test_same_image_in_train_and_val_is_warned_and_listed(dirty):
    root, outcomes, clf, run = dirty
    pairs = json.loads((run / "data.json").read_text())["train_val_duplicates"]
    assert [[Path(a).name, Path(b).name] for a, b in pairs] == [["blue_0.png", "copy-of-blue_0.png"]]


def test_duplicate_warning_reaches_the_cli(tmp_path, capsys):
    root = make_folder(tmp_path / "d", per_class=3, val_per_class=2)
    (root / "val" / "red" / "dup.png").write_bytes((root / "train" / "red" / "red_0.png").read_bytes())
    assert main(["--quiet", "train", str(root), "--out", str(tmp_path / "run"), *FAST_CLI,
                 "--cache", str(tmp_path / "c")]) == 0
    assert "warning: 1 image(s) are in both train and val" in capsys.readouterr().out


# -- clear errors, before any work ------------------------------------------------------------------

def test_class_only_in_val_is_a_clear_cli_error(tmp_path, capsys):
    root = make_folder(tmp_path / "d", per_class=2, val_per_class=1)
    make_image(root / "val" / "green" / "g.png", (40, 190, 60))
    assert main(["train", str(root), "--out", str(tmp_path / "run"), *FAST_CLI]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "['green']" in err and "training data lacks" in err
    assert not (tmp_path / "run").exists()


def test_class_folders_differing_only_in_case_are_a_clear_error(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2, val_per_class=0)
    make_image(root / "train" / "Blue" / "b.png", BLUE)
    with pytest.raises(DatasetError, match="'Blue' and 'blue'.*differ only in case"):
        load_splits(root)


def test_a_val_class_differing_from_train_only_in_case_is_a_clear_error(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2, val_per_class=1)
    (root / "val" / "red").rename(root / "val" / "Red")
    with pytest.raises(DatasetError, match=r"only in case: 'Red' \(training has 'red'\)\. Rename"):
        load_splits(root)


def test_a_class_missing_from_val_does_not_shift_labels(tmp_path):
    root = make_folder(tmp_path / "d", classes=("blue", "green", "red"), per_class=2, val_per_class=1)
    for p in (root / "val" / "green").iterdir():
        p.unlink()
    (root / "val" / "green").rmdir()
    s = load_splits(root)
    assert s.val.classes == ["blue", "green", "red"]
    assert {p.parent.name: s.val.classes[y] for p, y in s.val.samples} == {"blue": "blue", "red": "red"}


def test_every_skip_reason_is_our_error_type(tmp_path):
    """The reader's contract, on the suite's own files: RGB or ImageReadError, nothing else."""
    outcomes = _write_bad_files(tmp_path)
    for name, outcome in outcomes.items():
        if outcome == "skipped":
            with pytest.raises(ImageReadError):
                load_image(tmp_path / name)
        else:
            assert load_image(tmp_path / name).mode == "RGB"


def test_only_the_blank_one_pixel_image_is_suspect(dirty):
    """Of the converted oddities, only the 1x1 picture (one flat tone) is flagged; it is kept all the same."""
    root, outcomes, clf, run = dirty
    rows = json.loads((run / "data.json").read_text())["suspect_images"]
    assert [(Path(r["path"]).name, "flat tone" in r["reason"]) for r in rows] == [("one-pixel.png", True)]
    assert "one-pixel.png" not in _skipped(clf)
