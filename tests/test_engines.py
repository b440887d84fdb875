"""Inference engines and the input pipeline: torch and ONNX Runtime agree, read-ahead is bounded."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import FAST, make_image, recording_opens
from headstart.backbones.base import create_backbone
from headstart.data.images import load_image
from headstart.data.pipeline import decoded_batches
from headstart.data.transforms import EvalTransform
from headstart.engines import OnnxRunner, make_runner
from headstart.errors import ConfigError
from headstart.features import FeatureCache, default_threads, extract_features


@pytest.mark.parametrize("name,size", [("vgg16", 32), ("efficientnet_lite0", 64)])
def test_torch_and_onnx_engines_agree(name, size):
    bb = create_backbone(name, weights=None, input_size=size).eval()
    x = torch.randn(5, 3, size, size)
    with torch.inference_mode():
        reference = bb.body(x)
    onnx, torch_runner = make_runner(bb, "onnx"), make_runner(bb, "torch")
    assert (onnx.engine, torch_runner.engine) == ("onnx", "torch")
    one_run = OnnxRunner(onnx.path, threads=2, lanes=1)  # one run at a time on both threads, not split in lanes
    assert (onnx.lanes, one_run.lanes) == (default_threads(), 1)
    two_lanes = OnnxRunner(onnx.path, threads=2, lanes=2)  # split in two lanes whatever cores this process has
    assert two_lanes.lanes == 2
    for out in (onnx(x), one_run(x), two_lanes(x), torch_runner(x)):
        assert out.shape == reference.shape
        scale = reference.abs().max().item()
        assert (out - reference).abs().max().item() <= 1e-4 * scale + 1e-6


def test_onnx_graph_is_exported_once_and_kept_next_to_the_feature_cache(tmp_path):
    bb = create_backbone("test_tiny")
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
    bb = create_backbone("test_tiny")
    with pytest.raises(ConfigError, match="auto, torch, onnx"):
        make_runner(bb, "tensorrt")


def test_extraction_gives_the_same_features_on_either_engine(image_folder):
    bb = create_backbone("test_tiny")
    paths = sorted((image_folder / "train").glob("*/*.png"))
    a = extract_features(bb, paths, None, engine="torch", batch_size=5)
    b = extract_features(bb, paths, None, engine="onnx", batch_size=5)
    assert a.ok == b.ok == list(range(len(paths)))
    torch.testing.assert_close(a.features, b.features, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("read_ahead,most", [(True, 4 + 1 + 6), (False, 4)])
def test_read_ahead_is_bounded_and_order_and_errors_are_kept(tmp_path, read_ahead, most):
    paths = [make_image(tmp_path / f"{i}.png", (10 * i, 0, 0)) for i in range(40)]
    paths[7].write_bytes(b"broken")
    base = EvalTransform(create_backbone("test_tiny").data_config)
    decoded, taken = [], []

    class Counting:  # the Transform contract (headstart.protocols), counting its calls
        pixels = False

        def spec(self):
            return None

        def __call__(self, im, key=None):
            decoded.append(1)
            return base(im)

    transform = Counting()

    def indices():  # the pipeline takes an index for each image it will decode
        for i in range(40):
            taken.append(i)
            yield i

    batches = decoded_batches(paths, indices(), transform, batch_size=4, threads=2, prefetch=6,
                              read_ahead=read_ahead)
    first = next(batches)
    # a slow backbone holds the first batch: reading ahead, the decoders have taken at most `most` images in,
    # however long it holds it; in turns, they have decoded this batch and nothing beyond it
    if read_ahead:
        assert len(decoded) <= len(taken) <= most
    else:
        assert len(decoded) == most
    rest = list(batches)
    idx = first[0] + [i for b in rest for i in b[0]]
    assert idx == [i for i in range(40) if i != 7]
    assert [e for b in [first] + rest for e in b[2]][0][0] == 7
    assert all(b[1].shape[0] == len(b[0]) for b in [first] + rest)


def test_the_backbone_starts_after_a_few_images_while_later_files_are_still_hashed(tmp_path):
    paths = [make_image(tmp_path / f"{i}.png", (2 * i, 0, 0)) for i in range(120)]
    paths[50].write_bytes(b"broken")
    bb = create_backbone("test_tiny").eval()
    calls = []

    with recording_opens() as opened:  # each image file is opened once: its bytes are hashed, then decoded
        class Runner:  # the Runner contract (headstart.protocols), recording what it was handed
            engine, read_ahead, lanes = "test", True, 1

            def __call__(self, x):
                calls.append((len(x), len({p for p in opened if p.startswith(str(tmp_path))})))
                with torch.inference_mode():
                    return bb.body(x)

            def submit(self, x):
                raise AssertionError("one lane: run_batches calls the runner directly")

        runner = Runner()

        ex = extract_features(bb, paths, None, runner=runner, batch_size=8)
    assert calls[0][0] == 2  # a quarter batch first: the backbone waits for 2 images, not 8
    assert calls[0][1] < 60  # files are hashed as extraction goes, not all before it
    assert sum(n for n, _ in calls) == ex.computed == 119 and ex.ok == [i for i in range(120) if i != 50]
    with torch.inference_mode():  # each row is its own image's features, past the broken file too
        own = bb.body(EvalTransform(bb.data_config)(load_image(paths[61]))[None])[0]
    torch.testing.assert_close(ex.features[60], own)


def test_prediction_is_the_same_on_either_engine_and_in_chunks(image_folder, tmp_path, capsys):
    import json

    import numpy as np

    import headstart
    from headstart.cli import main
    from headstart.predict import Predictor

    clf = headstart.ImageClassifier(**FAST, engine="torch").fit(image_folder)
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


class _LaneRunner:
    """A runner (the Runner contract) with two lanes whose features are each image's mean; records the parts
    handed to it.

    ``out_of_order``: of each two parts in a row, the first finishes only once the second has, so results come
    out of order whatever the threads' timing.
    """

    engine, read_ahead, lanes = "test", True, 2

    def __init__(self, fail_on: float | None = None, out_of_order: bool = False):
        self.pool = ThreadPoolExecutor(2)
        self.fail_on, self.out_of_order = fail_on, out_of_order
        self.submitted = 0
        self.finished: list[int] = []  # parts, in the order they finished
        self.done: dict[int, threading.Event] = {}

    def run(self, k: int, x):
        try:
            if self.out_of_order and k % 2 == 0:
                assert self.done[k + 1].wait(timeout=60), f"part {k + 1} never ran"
            if self.fail_on is not None and (x.mean(dim=(1, 2, 3)) == self.fail_on).any():
                raise ValueError("this image breaks the engine")
            self.finished.append(k)
            return x.mean(dim=(2, 3))
        finally:
            self.done[k].set()

    def __call__(self, x):
        raise AssertionError("two lanes: run_batches submits parts")

    def submit(self, x):
        k = self.submitted
        self.submitted += 1
        for j in (k, k + 1):
            self.done.setdefault(j, threading.Event())
        return self.pool.submit(self.run, k, x)


def test_lanes_give_every_image_its_own_features_with_few_parts_in_flight():
    from headstart.engines import run_batches

    runner = _LaneRunner(out_of_order=True)
    images = torch.arange(23, dtype=torch.float32).reshape(23, 1, 1, 1).expand(23, 3, 2, 2).contiguous()
    batches = ([list(range(s, min(s + 5, 23))), images[s:s + 5]] for s in range(0, 23, 5))
    seen, most, consumed = {}, 0, 0
    for idx, feats in run_batches(runner, batches):
        consumed += 1
        most = max(most, runner.submitted - consumed + 1)
        for i, f in zip(idx, feats):
            assert i not in seen
            seen[i] = f
    assert runner.finished[:2] == [1, 0]  # the parts did finish out of order
    assert sorted(seen) == list(range(23))
    assert all(torch.equal(seen[i], torch.full((3,), float(i))) for i in seen)  # each index got its own image's
    assert runner.submitted == 10  # every batch in two parts, one per lane
    assert most <= runner.lanes + 1  # the lanes' parts plus one queued: memory stays bounded


def test_an_engine_error_in_a_lane_reaches_the_caller_and_stops_the_rest():
    from headstart.engines import run_batches

    runner = _LaneRunner(fail_on=6.0)
    images = torch.arange(40, dtype=torch.float32).reshape(40, 1, 1, 1).expand(40, 3, 2, 2).contiguous()
    batches = ([list(range(s, s + 4)), images[s:s + 4]] for s in range(0, 40, 4))
    with pytest.raises(ValueError, match="breaks the engine"):
        for _ in run_batches(runner, batches):
            pass
    runner.pool.shutdown(wait=True)
    assert runner.submitted < 20  # the batches after the error were never run
    assert len(runner.finished) <= runner.submitted - 1
