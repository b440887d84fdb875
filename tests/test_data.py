"""Datasets, splits and image reading: layouts, hygiene, and clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import make_folder, make_image
from headstart.backbones import DataConfig
from headstart.data import load_image, load_splits, scan_folder
from headstart.data.datasets import read_csv
from headstart.data.transforms import resize_for
from headstart.errors import DatasetError, ImageReadError


def test_train_val_layout_and_class_order(image_folder):
    s = load_splits(image_folder)
    assert s.train.classes == ["blue", "red"]
    assert len(s.train) == 16 and len(s.val) == 8
    assert "val" in s.split_note


def test_flat_folder_is_split_stratified_and_seeded(tmp_path):
    make_folder(tmp_path / "d", per_class=10, val_per_class=0)
    flat = tmp_path / "d" / "train"
    a, b = load_splits(flat, seed=3), load_splits(flat, seed=3)
    assert a.val.paths == b.val.paths
    assert a.val.counts() == {"blue": 2, "red": 2} and a.train.counts() == {"blue": 8, "red": 8}
    assert set(a.val.paths).isdisjoint(a.train.paths)
    assert load_splits(flat, seed=4).val.paths != a.val.paths


def test_one_class_is_a_clear_error(tmp_path):
    make_image(tmp_path / "only" / "a.png", (1, 2, 3))
    with pytest.raises(DatasetError, match="at least two"):
        scan_folder(tmp_path)


def test_empty_class_is_a_clear_error(image_folder):
    (image_folder / "train" / "ghost").mkdir()
    with pytest.raises(DatasetError, match="ghost.*holds no images"):
        load_splits(image_folder)


def test_class_only_in_val_is_a_clear_error(image_folder):
    make_image(image_folder / "val" / "green" / "g.png", (0, 255, 0))
    with pytest.raises(DatasetError, match=r"\['green'\].*training data lacks"):
        load_splits(image_folder)


def test_hidden_and_junk_files_are_passed_over(image_folder):
    cls = image_folder / "train" / "blue"
    (cls / ".DS_Store").write_bytes(b"\0\0")
    (cls / "__MACOSX").mkdir()
    make_image(cls / "__MACOSX" / "x.png", (0, 0, 0))
    make_image(cls / ".ipynb_checkpoints" / "y.png", (0, 0, 0))
    (cls / "notes.txt").write_text("hi")
    ds = scan_folder(image_folder / "train")
    assert len(ds) == 16
    assert any("notes.txt" in p and "not an image" in r for p, r in ds.ignored)


def test_csv_dataset(tmp_path, image_folder):
    rows = ["path,label"] + [f"{p.relative_to(image_folder)},{p.parent.name}" for p in
                             sorted((image_folder / "train").glob("*/*.png"))]
    (image_folder / "labels.csv").write_text("\n".join(rows))
    ds = read_csv(image_folder / "labels.csv")
    assert ds.classes == ["blue", "red"] and len(ds) == 16 and all(p.is_file() for p in ds.paths)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16", "LA"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    a = (np.arange(32 * 32 * 3) % 251).reshape(32, 32, 3).astype(np.uint8)
    im = Image.fromarray(a).convert(mode) if mode != "I;16" else Image.fromarray(
        (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16))
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (32, 32)
    if mode == "I;16":  # 16-bit range scaled, not clipped to white
        assert 0 < np.asarray(out).mean() < 255


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


@pytest.mark.parametrize("content,reason", [
    (b"", "empty"),
    (b"<html><body>404</body></html>", "not a readable image"),
    ("truncated", "truncated"),
])
def test_bad_files_raise_our_error_only(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason):
        load_image(path)


def test_a_long_strip_is_cropped_before_resizing():
    strip = Image.new("RGB", (20000, 20), (10, 20, 30))
    out = resize_for(strip, DataConfig(input_size=(224, 224), resize_mode="crop", crop_pct=0.875))
    assert out.size == (224, 224)
    assert resize_for(strip, DataConfig(input_size=(50, 60), resize_mode="squash")).size == (60, 50)
