"""Training recipes: frozen-aug on cached views, finetune on boundary activations, checkpoints and resume, TTA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import headstart
from conftest import FAST
from headstart.backbones import create_backbone, names, registry
from headstart.data.augment import PRESETS, AugmentedView
from headstart.training.finetune import split_backbone

SRC = str(Path(headstart.__file__).resolve().parents[1])


@pytest.mark.parametrize("name", names(include_hidden=True))
def test_every_backbone_splits_at_each_boundary_into_parts_that_compose(name):
    bb = create_backbone(name, weights=None, input_size=64).eval()
    lower, upper = split_backbone(bb, bb.entry.finetune_groups)
    assert lower.feature_shape != bb.feature_shape or bb.entry.finetune_groups == 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(upper(lower(x)), bb.eval()(x), atol=1e-4, rtol=1e-3)


def test_augmented_views_are_fixed_per_image_and_differ_between_views():
    cfg = registry.get("test_tiny").data_config
    im = Image.effect_mandelbrot((64, 48), (-2, -1.5, 1, 1.5), 50).convert("RGB")
    v0, v0b, v1 = (AugmentedView(cfg, PRESETS["strong"], i, seed=0) for i in (0, 0, 1))
    assert torch.equal(v0(im, "abc"), v0b(im, "abc"))
    assert not torch.equal(v0(im, "abc"), v1(im, "abc"))
    assert v0(im, "abc").shape == (3, 32, 32)


def test_frozen_aug_caches_its_views(image_folder):
    first = headstart.ImageClassifier(**FAST, strategy="frozen-aug", views=3, head="flatten").fit(image_folder)
    assert first.report_.backbone_passes == {"train": 16 * 4, "val": 8}  # eval view + 3 augmented
    again = headstart.ImageClassifier(**FAST, strategy="frozen-aug", views=3, head="avg").fit(image_folder)
    assert again.report_.backbone_passes == {"train": 0, "val": 0}
    assert first.metrics_["val"]["accuracy"] == 1.0


def test_finetune_trains_only_the_unfrozen_groups(image_folder):
    before = create_backbone("test_tiny")
    # no validation set: epochs are judged on training loss, which fine-tuning lowers, so its weights are kept
    clf = headstart.ImageClassifier(**FAST, strategy="finetune", views=2, unfreeze=1, finetune_epochs=3,
                                    val_fraction=0).fit(image_folder / "train")
    after = clf.model_.backbone
    frozen = after.body.block2  # block2 stays, block3 trains
    assert all(torch.equal(a, b) for a, b in zip(frozen.state_dict().values(),
                                                  before.body.block2.state_dict().values()))
    assert not torch.equal(after.body.block3.block3_conv.weight, before.body.block3.block3_conv.weight)
    # BatchNorm statistics keep their pretrained values (inference mode while fine-tuning)
    assert torch.equal(after.body.block3.block3_bn.running_mean, before.body.block3.block3_bn.running_mean)
    assert [h["stage"] for h in clf.history_].count("finetune") >= 1
    assert not any(p.requires_grad for p in after.parameters())
    assert clf.evaluate(image_folder / "val")["accuracy"] == 1.0


def test_fine_tuning_starts_from_a_hidden_layer_head_chosen_by_cross_validation(image_folder, monkeypatch):
    # the epoch-loop head wins (the only candidate): refitted on all of train, its val scores on the saved epoch only
    from headstart.training import select

    monkeypatch.setattr(select, "C_GRID", ())
    clf = headstart.ImageClassifier(**(FAST | dict(head_search="auto", epochs=3, patience=3, finetune_epochs=2)),
                                    strategy="finetune").fit(image_folder)
    assert clf.report_.head_selection["chosen"]["name"].startswith("hidden")
    assert "val_accuracy" in clf.report_.stages["head"]  # what fine-tuning is compared with: the saved epoch
    assert [h["stage"] for h in clf.history_].count("finetune") >= 1
    assert clf.evaluate(image_folder / "val")["accuracy"] == 1.0


def _ctrl_c_after(n: int, checkpoint: Path, monkeypatch) -> None:
    """A Ctrl-C right after the ``n``-th fine-tuning checkpoint has landed in ``checkpoint``'s place."""
    real, landed = os.replace, []

    def replace(src, dst, *a, **k):
        real(src, dst, *a, **k)
        if Path(dst) == checkpoint:
            landed.append(dst)
            if len(landed) == n:
                raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace)


def _interrupted_and_resumed(kw, data, tmp_path, monkeypatch, checkpoint: str, n: int):
    """The same fit whole, and stopped by Ctrl-C after the ``n``-th landing of ``checkpoint``, then resumed."""
    whole = headstart.ImageClassifier(**kw).fit(data, out=tmp_path / "a")
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        _ctrl_c_after(n, tmp_path / "b" / "checkpoints" / checkpoint, m)
        headstart.ImageClassifier(**kw).fit(data, out=tmp_path / "b")
    return whole, headstart.ImageClassifier(**kw).fit(data, out=tmp_path / "b", resume=True)


def _assert_same_run(resumed, whole, data) -> None:
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history_) == strip(whole.history_)
    files = sorted((data / "val").glob("*/*.png"))
    torch.testing.assert_close(torch.tensor(resumed.predict_proba(files)), torch.tensor(whole.predict_proba(files)))


def test_interrupted_finetune_resumes_to_the_same_result(image_folder, tmp_path, monkeypatch):
    kw = FAST | dict(strategy="finetune", views=2, unfreeze=2, finetune_epochs=6, dropout=0.3)
    whole, resumed = _interrupted_and_resumed(kw, image_folder, tmp_path, monkeypatch, "finetune.safetensors", 3)
    _assert_same_run(resumed, whole, image_folder)


def test_fine_tuning_interrupted_at_its_second_rate_resumes_to_the_same_result(image_folder, tmp_path, monkeypatch):
    kw = FAST | dict(strategy="finetune", views=1, finetune_epochs=3, finetune_lr=None, epochs=3)
    whole, resumed = _interrupted_and_resumed(kw, image_folder, tmp_path, monkeypatch, "finetune-2.safetensors", 2)
    assert len(whole.report_.lr_find["tried"]) == 3
    assert resumed.report_.lr_find["tried"] == whole.report_.lr_find["tried"]
    _assert_same_run(resumed, whole, image_folder)


# the CLI, killed with SIGKILL by itself right after its CHECKPOINTS-th fine-tuning checkpoint has landed
KILLED_AFTER = r"""
import os, signal, sys
from pathlib import Path
from headstart.cli import main
checkpoint, n = Path(sys.argv[1]), int(sys.argv[2])
real, landed = os.replace, []
def replace(src, dst, *a, **k):
    real(src, dst, *a, **k)
    if Path(dst) == checkpoint:
        landed.append(dst)
        if len(landed) == n:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow  # several processes: runs in the slow tier
def test_training_killed_with_sigkill_resumes_to_the_same_metrics(image_folder, tmp_path):
    # resuming must reproduce the run exactly; whether random weights learn anything doesn't matter here
    args = [str(image_folder), "--backbone", "test_tiny", "--random-init", "--strategy", "finetune",
            "--views", "2", "--unfreeze", "2", "--finetune-epochs", "12", "--epochs", "5", "--dropout", "0.2"]
    env = os.environ | {"PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "headstart.cli", "--quiet"]
    subprocess.run(cmd + ["train", "--out", str(tmp_path / "whole")] + args, env=env, check=True,
                   capture_output=True)
    ckpt = tmp_path / "killed" / "checkpoints" / "finetune.safetensors"
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER, str(ckpt), "2", "--quiet", "train", "--out",
                             str(tmp_path / "killed")] + args, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL, in the middle of fine-tuning
    assert ckpt.exists() and not (tmp_path / "killed" / "metrics.json").exists()
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
    mirrored = []
    for i, f in enumerate(files):
        with Image.open(f) as im:
            mirrored.append(tmp_path / f"mirror-{i}.png")
            im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored[-1])
    plain, of_mirrors = clf.predict_proba(files), clf.predict_proba(mirrored)
    clf.tta = True
    both = clf.predict_proba(files)
    assert both.shape == plain.shape and not (both == plain).all()
    # each image's probabilities are the mean of its own and its mirror image's
    np.testing.assert_allclose(both, (plain + of_mirrors) / 2, atol=1e-5)
    assert clf.evaluate(image_folder / "val")["tta"] is True
