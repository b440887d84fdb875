"""Concatenated backbones (``--backbone a+b``): each member prepares images its own way and keeps its own cache
entries; the run records every member, loads back and predicts as the model in memory did."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import headstart
from conftest import FAST, FAST_CLI
from headstart import ImageClassifier
from headstart.backbones import ConcatBackbone, create_backbone, registry
from headstart.backbones.tiny import TINY
from headstart.cli import main
from headstart.config import DataConfig
from headstart.errors import ConfigError, UnknownBackboneError
from headstart.features import extract_features


@pytest.fixture
def other_tiny(monkeypatch) -> str:
    """A second tiny backbone with preprocessing of its own (24 px, other mean and std), for this test only."""
    entry = dataclasses.replace(TINY, name="test_tiny_24", data_config=DataConfig(
        input_size=(24, 24), resize_mode="squash", crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    monkeypatch.setitem(registry._REGISTRY, entry.name, entry)
    return f"test_tiny+{entry.name}"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_features_are_each_members_own_joined(image_folder, other_tiny, tmp_path):
    bb = create_backbone(other_tiny).freeze()
    assert isinstance(bb, ConcatBackbone) and [m.data_config.input_size for m in bb.members] == [(32, 32), (24, 24)]
    paths = sorted((image_folder / "train").rglob("*.png"))
    joined = extract_features(bb, paths, progress=False)
    alone = [extract_features(m, paths, progress=False, pool="avg").features for m in bb.members]
    assert joined.features.shape == (len(paths), 64)
    assert torch.allclose(joined.features, ConcatBackbone.join(alone))
    assert joined.computed == 2 * len(paths)


def test_a_concatenation_trains_saves_loads_and_predicts_as_in_memory(image_folder, other_tiny, tmp_path, capsys):
    run = tmp_path / "run"
    clf = ImageClassifier(**(FAST | {"backbone": other_tiny}), progress=False).fit(image_folder)
    clf.save(run)
    config = json.loads((run / "config.json").read_text())
    assert config["backbone"]["name"] == other_tiny
    assert [m["name"] for m in config["backbone"]["members"]] == ["test_tiny", "test_tiny_24"]
    assert [d["input_size"] for d in config["data_config"]] == [[32, 32], [24, 24]]
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("backbone.members.0.") for k in keys) and any(k.startswith("backbone.members.1.")
                                                                          for k in keys)
    val = sorted((image_folder / "val").rglob("*.png"))
    loaded = headstart.load(run)
    np.testing.assert_allclose(loaded.predict_proba(val), clf.predict_proba(val), atol=1e-6)
    assert main(["predict", str(run), str(val[0]), "--format", "json"]) in (0, None)
    row = json.loads(capsys.readouterr().out)[0]
    assert row["label"] == clf.predict(val[0]) and abs(row["probability"] - clf.predict_proba(val[0]).max()) < 1e-5
    assert main(["evaluate", str(run), str(image_folder / "val")]) in (0, None)
    assert "accuracy" in capsys.readouterr().out
    loaded.tta = True
    assert loaded.predict_proba(val).shape == (len(val), 2)


def test_the_cli_trains_a_concatenation_and_a_second_training_runs_no_backbone_pass(image_folder, other_tiny,
                                                                                   tmp_path, capsys):
    cache = str(tmp_path / "cache")
    args = ["train", str(image_folder), *FAST_CLI, "--backbone", other_tiny, "--cache", cache]
    assert main([*args, "--out", str(tmp_path / "a")]) in (0, None)
    assert (tmp_path / "a" / "report.html").is_file()  # without heatmaps: explain takes one backbone
    first = json.loads((tmp_path / "a" / "data.json").read_text())
    assert first["backbone_passes"] == {"train": 32, "val": 16}  # 16 train and 8 val images, two members
    assert main([*args, "--out", str(tmp_path / "b"), "--no-report"]) in (0, None)
    second = json.loads((tmp_path / "b" / "data.json").read_text())
    assert second["backbone_passes"] == {"train": 0, "val": 0}
    assert second["from_cache"] == {"train": 32, "val": 16}


def test_augmented_views_fall_out_of_each_members_own_views(image_folder, other_tiny):
    clf = ImageClassifier(**(FAST | {"backbone": other_tiny}), strategy="frozen-aug", views=2,
                          progress=False).fit(image_folder)
    assert clf.report_.backbone_passes["train"] == 2 * 3 * 16  # two members, the eval view and two augmented
    assert clf.predict(image_folder / "val") is not None


@pytest.mark.parametrize("name, expected", [
    ("test_tiny+", "empty member"),
    ("+test_tiny", "empty member"),
    ("test_tiny+no_such_net", "'no_such_net'"),
])
def test_bad_names_are_one_line_errors(tmp_path, image_folder, capsys, name, expected):
    with pytest.raises((ConfigError, UnknownBackboneError), match=expected):
        ImageClassifier(**(FAST | {"backbone": name})).fit(image_folder)
    assert main(["train", str(image_folder), "--out", str(tmp_path / "run"), *FAST_CLI, "--backbone", name]) == 1
    assert expected in _one_error_line(capsys)


@pytest.mark.parametrize("extra, expected", [
    (["--strategy", "finetune"], "--backbone test_tiny --strategy finetune"),
    (["--head", "flatten"], "use --head avg"),
    (["--input-size", "48"], "leave --input-size out"),
])
def test_what_a_concatenation_cannot_train_is_refused_with_what_to_do(tmp_path, image_folder, capsys, extra,
                                                                       expected):
    code = main(["train", str(image_folder), "--out", str(tmp_path / "run"), *FAST_CLI, "--backbone",
                 "test_tiny+test_tiny", *extra])
    assert code == 1
    assert expected in _one_error_line(capsys)


def test_export_serve_and_explain_refuse_a_concatenated_run(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    ImageClassifier(**(FAST | {"backbone": "test_tiny+test_tiny"}), progress=False).fit(image_folder).save(run)
    image = next((image_folder / "val").rglob("*.png"))
    for argv in (["export", str(run), "--out", str(tmp_path / "m.onnx")], ["explain", str(run), str(image)],
                 ["summary", "test_tiny+test_tiny"], ["lr-find", str(image_folder), *FAST_CLI, "--backbone",
                                                      "test_tiny+test_tiny", "--out", str(tmp_path / "lr.png")]):
        assert main(argv) == 1
        err = _one_error_line(capsys)
        assert "concatenates several" in err and "headstart predict" in err
    from headstart.serve.model import ServedModel

    with pytest.raises(ConfigError, match="headstart serve takes one backbone"):
        ServedModel.open(run)
