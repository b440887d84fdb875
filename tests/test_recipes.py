"""Training recipes: frozen-aug on cached views, finetune on boundary activations, checkpoints and resume, TTA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import headstart
from headstart.backbones import create_backbone, names
from headstart.data.augment import PRESETS, AugmentedView
from headstart.training import recipes
from headstart.training.finetune import split_backbone

FAST = dict(backbone="vgg16", weights=None, input_size=32, epochs=15, patience=15)


@pytest.mark.parametrize("name", names())
def test_every_backbone_splits_at_each_boundary_into_parts_that_compose(name):
    bb = create_backbone(name, weights=None, input_size=64).eval()
    lower, upper = split_backbone(bb, bb.entry.finetune_groups)
    assert lower.feature_shape != bb.feature_shape or bb.entry.finetune_groups == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(upper(lower(x)), bb.eval()(x), atol=1e-4, rtol=1e-3)


def test_augmented_views_are_fixed_per_image_and_differ_between_views():
    cfg = create_backbone("vgg16", weights=None, input_size=32).data_config
    im = Image.effect_mandelbrot((64, 48), (-2, -1.5, 1, 1.5), 50).convert("RGB")
    v0, v0b, v1 = (AugmentedView(cfg, PRESETS["strong"], i, seed=0) for i in (0, 0, 1))
    assert torch.equal(v0(im, "abc"), v0b(im, "abc"))
    assert not torch.equal(v0(im, "abc"), v1(im, "abc"))
    assert v0(im, "abc").shape == (3, 32, 32)


def test_frozen_aug_caches_its_views(image_folder):
    first = headstart.ImageClassifier(**FAST, strategy="frozen-aug", views=3).fit(image_folder)
    assert first.report_.backbone_passes == {"train": 16 * 4, "val": 8}  # eval view + 3 augmented
    again = headstart.ImageClassifier(**FAST, strategy="frozen-aug", views=3, head="avg").fit(image_folder)
    assert again.report_.backbone_passes == {"train": 0, "val": 0}
    assert first.metrics_["val"]["accuracy"] == 1.0


# Fine-tuning needs features that mean something: a random network's are near-identical for these pictures.
PRETRAINED = dict(backbone="efficientnet_lite0", input_size=64, epochs=15, patience=15)


def test_finetune_trains_only_the_unfrozen_groups(image_folder):
    before = create_backbone("efficientnet_lite0", input_size=64)
    # no validation set: epochs are judged on training loss, which fine-tuning lowers, so its weights are kept
    clf = headstart.ImageClassifier(**PRETRAINED, strategy="finetune", views=2, unfreeze=1, finetune_epochs=3,
                                    val_fraction=0).fit(image_folder / "train")
    after = clf.model_.backbone
    frozen = after.body.model.blocks[6]  # stage7 stays, head_conv trains
    assert all(torch.equal(a, b) for a, b in zip(frozen.state_dict().values(),
                                                  before.body.model.blocks[6].state_dict().values()))
    assert not torch.equal(after.body.model.conv_head.weight, before.body.model.conv_head.weight)
    # BatchNorm statistics keep their ImageNet values (inference mode while fine-tuning)
    assert torch.equal(after.body.model.bn2.running_mean, before.body.model.bn2.running_mean)
    assert [h["stage"] for h in clf.history_].count("finetune") >= 1
    assert not any(p.requires_grad for p in after.parameters())
    assert clf.evaluate(image_folder / "val")["accuracy"] == 1.0


def _interrupting(after_epochs):
    real = recipes.run_loop

    def run_loop(*args, **kwargs):
        def stop(row):
            if row["epoch"] == after_epochs:
                raise KeyboardInterrupt

        return real(*args, **kwargs | {"on_epoch": stop})

    return run_loop


def test_interrupted_finetune_resumes_to_the_same_result(image_folder, tmp_path, monkeypatch):
    kw = FAST | dict(strategy="finetune", views=2, unfreeze=2, finetune_epochs=6, dropout=0.3)
    whole = headstart.ImageClassifier(**kw).fit(image_folder, out=tmp_path / "a")
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(recipes, "run_loop", _interrupting(3))
        headstart.ImageClassifier(**kw).fit(image_folder, out=tmp_path / "b")
    resumed = headstart.ImageClassifier(**kw).fit(image_folder, out=tmp_path / "b", resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history_) == strip(whole.history_)
    files = sorted((image_folder / "val").glob("*/*.png"))
    torch.testing.assert_close(torch.tensor(resumed.predict_proba(files)), torch.tensor(whole.predict_proba(files)))


def test_training_killed_with_sigkill_resumes_to_the_same_metrics(image_folder, tmp_path):
    # resuming must reproduce the run exactly; whether random weights learn anything doesn't matter here
    args = [str(image_folder), "--backbone", "vgg16", "--random-init", "--input-size", "32", "--strategy", "finetune",
            "--views", "2", "--unfreeze", "2", "--finetune-epochs", "12", "--epochs", "5", "--dropout", "0.2"]
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "headstart.cli", "--quiet"]
    subprocess.run(cmd + ["train", "--out", str(tmp_path / "whole")] + args, env=env, check=True,
                   capture_output=True)
    proc = subprocess.Popen(cmd + ["train", "--out", str(tmp_path / "killed")] + args, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints" / "finetune.safetensors"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not ckpt.exists():
        pytest.fail("training ended before its first fine-tuning checkpoint; nothing was killed mid-run")
    assert not (tmp_path / "killed" / "metrics.json").exists()
    subprocess.run(cmd + ["train", "--out", str(tmp_path / "killed"), "--resume"] + args, env=env, check=True,
                   capture_output=True)
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert resumed == whole
    assert (tmp_path / "whole" / "history.csv").read_text().count("\n") == \
        (tmp_path / "killed" / "history.csv").read_text().count("\n")


def test_tta_averages_the_mirror_image(image_folder, tmp_path):
    clf = headstart.ImageClassifier(**FAST).fit(image_folder)
    files = sorted((image_folder / "val").glob("*/*.png"))
    plain = clf.predict_proba(files)
    clf.tta = True
    both = clf.predict_proba(files)
    assert both.shape == plain.shape and not (both == plain).all()
    assert clf.evaluate(image_folder / "val")["tta"] is True
