"""Slow tier: the real weights on the real photos in ../shared (CI runs it with -m "slow or not slow")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import headstart
from conftest import HYMENOPTERA, VGG16_NOTOP, needs_shared
from headstart.cli import main
from headstart.data.transforms import EvalTransform
from report_page import CHROMIUM, assert_readable, open_report

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("image,expected", [("chelsea", {"tiger cat", "tabby, tabby cat", "Egyptian cat"}),
                                            ("coffee", {"espresso"})])
def test_default_backbone_with_its_top_knows_imagenet(image, expected):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image
    from timm.data import ImageNetInfo

    bb = headstart.create_backbone("efficientnet_lite0", include_top=True).eval()
    x = EvalTransform(bb.data_config)(Image.fromarray(getattr(skimage_data, image)()))[None]
    with torch.inference_mode():
        top = int(bb.forward_top(bb(x)).argmax())
    assert ImageNetInfo().index_to_description(top) in expected


@needs_shared(HYMENOPTERA)
def test_default_recipe_on_hymenoptera(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--quiet", "train", str(HYMENOPTERA), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "backbone passes: train 245, val 153" in out
    _check_the_report(run, tmp_path)
    assert main(["evaluate", str(run), str(HYMENOPTERA / "val"), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] >= 0.93 and report["backbone_passes"] == 0
    # another averaging head on the same images: every feature from the cache, which holds averages only
    assert main(["--quiet", "train", str(HYMENOPTERA), "--out", str(tmp_path / "run2"), "--hidden", "64", "--no-report"]) == 0
    assert "backbone passes: train 0, val 0" in capsys.readouterr().out
    # a flattening head needs the maps: computed once, then served to every head
    for k, passes in enumerate(["train 245, val 153", "train 0, val 0"]):
        assert main(["--quiet", "train", str(HYMENOPTERA), "--out", str(tmp_path / f"flat{k}"), "--head", "flatten", "--no-report"]) == 0
        assert f"backbone passes: {passes}" in capsys.readouterr().out


def _check_the_report(run, tmp_path):
    """The hymenoptera run's report in a browser: complete, offline, and showing the placeholder GIF among the
    ants as a suspect image, with its thumbnail."""
    if not Path(CHROMIUM).exists():
        return
    seen = open_report(run / "report.html", tmp_path / "hymenoptera-report.png")
    assert_readable(seen)
    assert any(i["alt"].endswith("imageNotFound.gif") for i in seen["images"])
    assert "Suspect images (1)" in seen["no_js"]["text"] and "backbone passes" in seen["no_js"]["text"]
    assert (run / "report.html").stat().st_size < 5 * 2**20


@needs_shared(HYMENOPTERA, VGG16_NOTOP)
def test_keras_seed_recipe_vgg16_flatten_at_150(tmp_path, capsys):
    clf = headstart.ImageClassifier(backbone="vgg16", weights=str(VGG16_NOTOP), input_size=150, head="flatten")
    clf.fit(HYMENOPTERA)
    assert clf.model_.backbone.feature_shape == (512, 4, 4)
    assert clf.model_.backbone.data_config.std == pytest.approx((1 / 255,) * 3, rel=1e-3)  # from the JSON beside it
    assert clf.metrics_["val"]["accuracy"] >= 0.88
    loaded = headstart.load(clf.save(tmp_path / "run"))
    files = sorted((HYMENOPTERA / "val" / "bees").glob("*"))[:8]
    np.testing.assert_allclose(loaded.predict_proba(files), clf.predict_proba(files), atol=1e-5)


@needs_shared(HYMENOPTERA)
def test_best_offline_recipe_beats_the_tutorial(tmp_path):
    # PyTorch's transfer-learning tutorial reaches 0.954 on this split with ResNet-18 as a fixed feature extractor
    # the best offline recipe: efficientnet_lite2, frozen, evaluated with test-time augmentation (image + mirror).
    # Without TTA its five seeds gave 0.954-0.967 (one image either side of 0.96); with it, 0.961-0.967
    clf = headstart.ImageClassifier(backbone="efficientnet_lite2", tta=True).fit(HYMENOPTERA)
    assert clf.evaluate(HYMENOPTERA / "val")["accuracy"] >= 0.96


@needs_shared(HYMENOPTERA)
def test_two_backbones_concatenated_reach_the_defaults_target(tmp_path):
    clf = headstart.ImageClassifier(backbone="efficientnet_lite0+efficientnet_lite2").fit(HYMENOPTERA)
    assert [m.data_config.input_size for m in clf.model_.backbone.members] == [(224, 224), (260, 260)]
    assert clf.metrics_["val"]["accuracy"] >= 0.95  # the target for the default; lite0 alone is below
    loaded = headstart.load(clf.save(tmp_path / "run"))
    files = sorted((HYMENOPTERA / "val" / "ants").glob("*"))[:8]
    np.testing.assert_allclose(loaded.predict_proba(files), clf.predict_proba(files), atol=1e-5)


@needs_shared(HYMENOPTERA)
def test_exported_onnx_model_matches_torch_on_real_photos(tmp_path):
    clf = headstart.ImageClassifier(epochs=15, engine="torch").fit(HYMENOPTERA / "train", val=HYMENOPTERA / "val")
    run = clf.save(tmp_path / "run")
    assert main(["--quiet", "export", str(run), "--out", str(tmp_path / "model.onnx")]) == 0
    exported = headstart.load(tmp_path / "model.onnx")
    photos = sorted((HYMENOPTERA / "val").glob("*/*"))
    clf_torch = headstart.load(run)
    clf_torch.engine = "torch"
    torch_probs = clf_torch.predict_proba(photos)
    onnx_probs = exported.predict_proba(photos)
    readable = ~np.isnan(torch_probs).any(1)
    assert readable.sum() >= 150
    np.testing.assert_array_equal(np.isnan(onnx_probs), np.isnan(torch_probs))
    np.testing.assert_allclose(onnx_probs[readable], torch_probs[readable], atol=1e-4)
    assert (onnx_probs[readable].argmax(1) == torch_probs[readable].argmax(1)).all()
