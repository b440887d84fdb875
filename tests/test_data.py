"""Datasets, splits and image reading: layouts, hygiene, and clear errors."""

from __future__ import annotations

import io

import numpy as np
import torch
import pytest
from PIL import Image, ImageFilter

from conftest import make_folder, make_image
from headstart.backbones import DataConfig
from headstart.data import load_image, load_splits, scan_folder
from headstart.data.datasets import read_csv
from headstart.data.transforms import resize_for
from headstart.data.images import load_pixels
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
    assert tuple(out.shape) == (3, 224, 224)
    assert out[:, 112, 112].tolist() == [10, 20, 30]
    assert tuple(resize_for(strip, DataConfig(input_size=(50, 60), resize_mode="squash")).shape) == (3, 50, 60)


def _jpeg(path, im, **kw):
    im.save(path, "JPEG", **kw)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_pipeline_reader_turns_photos_upright_like_pillow(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    im = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _jpeg(tmp_path / "o.jpg", im, exif=exif, quality=95)
    expected = np.asarray(load_image(path))
    assert expected.shape == ((40, 24, 3) if orientation >= 5 else (24, 40, 3))
    assert np.array_equal(load_pixels(path).permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("kind", ["420", "444", "progressive", "grey", "cmyk", "big"])
def test_pipeline_reader_gives_pillows_pixels(tmp_path, kind):
    """The same pixels as ``load_image`` for each kind of JPEG, with and without draft reduction."""
    rng = np.random.default_rng(1)
    size = (1200, 700) if kind == "big" else (120, 90)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).filter(ImageFilter.BLUR)
    kw = {"420": {"subsampling": 2}, "444": {"subsampling": 0}, "progressive": {"progressive": True},
          "grey": {}, "cmyk": {}, "big": {}}[kind]
    im = im.convert({"grey": "L", "cmyk": "CMYK"}.get(kind, "RGB"))
    path = _jpeg(tmp_path / f"{kind}.jpg", im, quality=90, **kw)
    for min_size in (None, 64, 300):
        expected = np.asarray(load_image(path, min_size))
        assert np.array_equal(load_pixels(path, min_size).permute(1, 2, 0).numpy(), expected), min_size
    if kind == "big":
        assert tuple(load_pixels(path, 300).shape) == (3, 350, 600)  # decoded at half size


@pytest.mark.parametrize("image", ["chelsea", "coffee", "astronaut"])
def test_eval_transform_matches_timms_pillow_transform(image):
    """Resampling on tensors gives what timm's own eval transform (Pillow, bicubic, crop_pct) gives."""
    import timm.data
    from skimage import data as skimage_data

    from headstart.backbones import registry
    from headstart.data.transforms import EvalTransform

    cfg = registry.get("efficientnet_lite0").data_config
    reference = timm.data.create_transform(input_size=(3, *cfg.input_size), interpolation=cfg.interpolation,
                                           crop_pct=cfg.crop_pct, mean=cfg.mean, std=cfg.std)
    im = Image.fromarray(getattr(skimage_data, image)())
    ours, theirs = EvalTransform(cfg)(im), reference(im)
    assert ours.shape == theirs.shape == (3, *cfg.input_size)
    levels = (ours - theirs).abs() * 255 * torch.tensor(cfg.std).view(3, 1, 1)  # back to 0..255 steps
    assert levels.max() <= 2.01 and levels.mean() < 0.05
