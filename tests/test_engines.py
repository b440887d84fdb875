"""Inference engines and the input pipeline: torch and ONNX Runtime agree, read-ahead is bounded."""

from __future__ import annotations

import pytest
import torch

from conftest import make_image
from headstart.backbones.base import create_backbone
from headstart.data.pipeline import decoded_batches
from headstart.data.transforms import EvalTransform
from headstart.engines import make_runner
from headstart.errors import ConfigError
from headstart.features import FeatureCache, extract_features


@pytest.mark.parametrize("name,size", [("vgg16", 32), ("efficientnet_lite0", 64)])
def test_torch_and_onnx_engines_agree(name, size):
    bb = create_backbone(name, weights=None, input_size=size).eval()
    x = torch.randn(5, 3, size, size)
    with torch.inference_mode():
        reference = bb.body(x)
    onnx, torch_runner = make_runner(bb, "onnx"), make_runner(bb, "torch")
    assert (onnx.engine, torch_runner.engine) == ("onnx", "torch")
    for out in (onnx(x), torch_runner(x)):
        assert out.shape == reference.shape
        scale = reference.abs().max().item()
        assert (out - reference).abs().max().item() <= 1e-4 * scale + 1e-6


def test_onnx_graph_is_exported_once_and_kept_next_to_the_feature_cache(tmp_path):
    bb = create_backbone("vgg16", weights=None, input_size=32)
    cache = FeatureCache(tmp_path / "c" / "features")
    make_runner(bb, "onnx", cache=cache)
    files = list((tmp_path / "c" / "onnx").glob("*.onnx"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    make_runner(bb, "auto", cache=cache)
    assert [f.stat().st_mtime_ns for f in (tmp_path / "c" / "onnx").glob("*.onnx")] == [stamp]
    # other weights, another graph
    with torch.no_grad():
        next(bb.body.parameters()).add_(1.0)
    make_runner(bb, "onnx", cache=cache)
    assert len(list((tmp_path / "c" / "onnx").glob("*.onnx"))) == 2


def test_unknown_engine_says_what_is_known():
    bb = create_backbone("vgg16", weights=None, input_size=32)
    with pytest.raises(ConfigError, match="auto, torch, onnx"):
        make_runner(bb, "tensorrt")


def test_extraction_gives_the_same_features_on_either_engine(image_folder):
    bb = create_backbone("vgg16", weights=None, input_size=32)
    paths = sorted((image_folder / "train").glob("*/*.png"))
    a = extract_features(bb, paths, None, engine="torch", batch_size=5)
    b = extract_features(bb, paths, None, engine="onnx", batch_size=5)
    assert a.ok == b.ok == list(range(len(paths)))
    torch.testing.assert_close(a.features, b.features, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("read_ahead,most", [(True, 4 + 1 + 6), (False, 4)])
def test_read_ahead_is_bounded_and_order_and_errors_are_kept(tmp_path, read_ahead, most):
    paths = [make_image(tmp_path / f"{i}.png", (10 * i, 0, 0)) for i in range(40)]
    paths[7].write_bytes(b"broken")
    bb = create_backbone("vgg16", weights=None, input_size=32)
    decoded = []
    base = EvalTransform(bb.data_config)

    def transform(im):
        decoded.append(1)
        return base(im)

    batches = decoded_batches(paths, range(40), transform, batch_size=4, threads=2, prefetch=6,
                              read_ahead=read_ahead)
    first = next(batches)
    import time

    time.sleep(0.3)  # a slow backbone: the decoders must wait (in turns: not run at all) while it holds a batch
    assert len(decoded) <= most
    rest = list(batches)
    idx = first[0] + [i for b in rest for i in b[0]]
    assert idx == [i for i in range(40) if i != 7]
    assert [e for b in [first] + rest for e in b[2]][0][0] == 7
    assert all(b[1].shape[0] == len(b[0]) for b in [first] + rest)


def test_prediction_is_the_same_on_either_engine_and_in_chunks(image_folder, tmp_path, capsys):
    import json

    import numpy as np

    import headstart
    from headstart.cli import main
    from headstart.predict import Predictor

    clf = headstart.ImageClassifier(backbone="vgg16", weights=None, input_size=32, epochs=20, engine="torch")
    clf.fit(image_folder)
    files = sorted((image_folder / "val").glob("*/*.png")) + [tmp_path / "missing.png"]
    whole = Predictor(clf.model_, engine="onnx").probabilities(files)[0]
    chunked, errors, ex = Predictor(clf.model_, batch_size=2, engine="torch", chunk=3).probabilities(files)
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    assert list(errors) == [len(files) - 1] and ex.ok == list(range(len(files) - 1))
    run = clf.save(tmp_path / "run")
    outputs = {}
    for engine in ("torch", "onnx"):
        assert main(["predict", str(run), str(image_folder / "val"), "--format", "json", "--engine", engine]) == 0
        outputs[engine] = json.loads(capsys.readouterr().out)
    assert [r["label"] for r in outputs["torch"]] == [r["label"] for r in outputs["onnx"]]
