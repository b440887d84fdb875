"""`headstart export`: one ONNX file that predicts like the torch model and carries its metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import headstart
from conftest import FAST
from headstart.cli import main
from headstart.errors import ConfigError, RunFormatError


@pytest.fixture
def run(image_folder, tmp_path):
    return headstart.ImageClassifier(**FAST).fit(image_folder).save(tmp_path / "run")


def test_exported_model_predicts_like_the_run(run, image_folder, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["classes"]) == ["blue", "red"]
    assert json.loads(meta["data_config"])["input_size"] == [32, 32]
    assert meta["headstart_version"] == headstart.__version__

    files = sorted((image_folder / "val").glob("*/*.png")) + [tmp_path / "missing.png"]
    from_run, from_onnx = headstart.load(run), headstart.load(out)
    assert from_onnx.classes_ == from_run.classes_
    expected = from_run.predict_proba(files)
    np.testing.assert_allclose(from_onnx.predict_proba(files), expected, atol=1e-5)  # NaN row for the missing file
    assert from_onnx.predict(files) == from_run.predict(files)
    assert from_onnx.evaluate(image_folder / "val")["accuracy"] == from_run.evaluate(image_folder / "val")["accuracy"]

    assert main(["predict", str(out), str(image_folder / "val"), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in rows] == [p.parent.name for p in sorted((image_folder / "val").glob("*/*.png"))]


def test_export_defaults_into_the_run_and_refuses_what_it_cannot_use(run, tmp_path, capsys):
    assert main(["export", str(run)]) == 0
    assert (run / "model.onnx").is_file()
    assert main(["export", str(run / "model.onnx")]) == 1
    assert "already an exported model" in capsys.readouterr().err
    assert main(["predict", str(run / "model.onnx"), str(tmp_path), "--engine", "torch"]) == 1
    assert "ONNX Runtime only" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="already saved"):
        headstart.load(run / "model.onnx").save(tmp_path / "again")
    stranger = tmp_path / "stranger.onnx"
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = h.make_graph([h.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]), str(stranger))
    with pytest.raises(RunFormatError, match="not a headstart export"):
        headstart.load(stranger)
