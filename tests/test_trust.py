"""Issue 19, a run you can trust: every failure is one line, numbers are checked where they enter, CSV labels
are read as written, a run is one consistent thing, and the output's disk is measured before training."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import headstart
from conftest import FAST, FAST_CLI, HYMENOPTERA, make_folder, make_image, needs_shared, png_header
from headstart.cli import main

SAVED = FAST | dict(epochs=3, patience=3, cache=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    data = make_folder(root / "d", per_class=3, val_per_class=1)
    run = headstart.ImageClassifier(**SAVED).fit(data).save(root / "run")
    return root, data, run


def rewrite_config(run: Path, change) -> None:
    """Edit a run's config the way a careful forger would: config.json and the copy inside the weights alike."""
    cfg = json.loads((run / "config.json").read_text())
    change(cfg)
    text = json.dumps(cfg)
    (run / "config.json").write_text(text)
    state = load_file(str(run / "model.safetensors"))
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        meta = dict(f.metadata() or {})
    save_file(state, str(run / "model.safetensors"), metadata=meta | {"config": text})


def _set(path: str, value):
    def change(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return change


_DELETE = object()


def _nested(depth: int):
    v = 0
    for _ in range(depth):
        v = [v]
    return v


def _raw_config(text: str):
    """config.json replaced by raw text (no valid JSON writer makes 1e400 or 100k nested lists)."""
    def write(run: Path):
        (run / "config.json").write_text(text)
    return write


# (case, how the run is damaged, extra CLI arguments after the run, where the argv starts) -> one line, exit 1
RUN_CASES = {
    "crop_pct 0": _set("data_config.crop_pct", 0),
    "crop_pct -1": _set("data_config.crop_pct", -1),
    "crop_pct NaN": _set("data_config.crop_pct", float("nan")),
    "crop_pct a string": _set("data_config.crop_pct", "0.9"),
    "crop_pct 1e-12": _set("data_config.crop_pct", 1e-12),  # valid in range, a resize to 3e13 px
    "mean NaN": _set("data_config.mean", [float("nan"), 0.5, 0.5]),
    "std inf": _set("data_config.std", [float("inf"), 0.5, 0.5]),
    "input size 20000": _set("data_config.input_size", [20000, 20000]),
    "input size a string": _set("data_config.input_size", "224"),
    "classes a bare string": _set("classes", "blue"),
    "classes duplicated": _set("classes", ["blue", "blue"]),
    "classes not strings": _set("classes", [1, 2]),
    "classes empty name": _set("classes", ["", "red"]),
    "no backbone name": _set("backbone.name", _DELETE),
    "backbone name a list": _set("backbone.name", ["test_tiny"]),
}
RAW_CASES = {
    "1e400 in config.json": lambda cfg: re.sub(r'"crop_pct": [0-9.]+', '"crop_pct": 1e400', json.dumps(cfg)),
    "deeply nested config.json": lambda cfg: json.dumps(cfg)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_a_damaged_run_config_is_one_line(case, trained, tmp_path, capsys):
    root, data, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    rewrite_config(copy, RUN_CASES[case])
    img = make_image(tmp_path / "x.png", (40, 60, 200))
    assert main(["predict", str(copy), str(img)]) == 1
    _one_line(capsys)


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_unparseable_config_json_is_one_line(case, trained, tmp_path, capsys):
    root, data, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(RAW_CASES[case](cfg))
    img = make_image(tmp_path / "x.png", (40, 60, 200))
    assert main(["predict", str(copy), str(img)]) == 1
    _one_line(capsys)


@pytest.mark.parametrize("flags", [
    ["--lr", "nan"], ["--lr", "inf"], ["--weight-decay", "nan"], ["--label-smoothing", "2"],
    ["--hidden", "1000000000"], ["--input-size", "20000"], ["--dropout", "nan"], ["--val-fraction", "nan"],
    ["--val-fraction", "1.5"], ["--patience", "-1"], ["--batch-size", "0"],
], ids=" ".join)
def test_absurd_training_flags_are_one_line_before_any_work(flags, image_folder, tmp_path, capsys):
    assert main(["train", str(image_folder), "--out", str(tmp_path / "run"), *FAST_CLI, *flags]) == 1
    _one_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_latin1_csv_is_one_line(tmp_path, capsys):
    for i, label in enumerate(["caf\xe9", "th\xe9"] * 2):
        make_image(tmp_path / f"{i}.png", (40, 60, 200 - 30 * i))
    (tmp_path / "data.csv").write_bytes("path,label\n".encode() + "".join(
        f"{i}.png,{label}\n" for i, label in enumerate(["caf\xe9", "th\xe9"] * 2)).encode("latin-1"))
    assert main(["train", str(tmp_path / "data.csv"), "--out", str(tmp_path / "run"), *FAST_CLI]) == 1
    assert "UTF-8" in _one_line(capsys)


def test_a_nul_in_a_path_is_one_line(trained, capsys):
    root, data, run = trained
    assert main(["predict", str(run), "bad\x00name.png"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # the path is reported as skipped, then the one error
    assert "NUL character" in lines[0] and lines[-1].startswith("error: ") and "Traceback" not in str(lines), lines


def test_evaluate_with_no_readable_image_is_one_line(trained, tmp_path, capsys):
    root, data, run = trained
    for c in ("blue", "red"):
        (tmp_path / "ev" / c).mkdir(parents=True)
        (tmp_path / "ev" / c / "x.png").write_bytes(b"not a png")
    assert main(["evaluate", str(run), str(tmp_path / "ev")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()  # each skipped file is reported, then the one error
    assert lines[-1].startswith("error: ") and all(line.startswith("skipped ") for line in lines[:-1]), lines


def test_an_unexpected_exception_is_one_line_with_the_debug_hint(image_folder, tmp_path, capsys, monkeypatch):
    def broken(self, *a, **k):
        raise ZeroDivisionError("division by zero")
    monkeypatch.setattr(headstart.api.ImageClassifier, "fit", broken)
    assert main(["train", str(image_folder), "--out", str(tmp_path / "run"), *FAST_CLI]) == 1
    err = _one_line(capsys)
    assert "ZeroDivisionError" in err and "run with --debug for the traceback" in err


# -- CSV labels are read as written -------------------------------------------------------------------------
def _csv(tmp_path: Path, text: str, *, bom: bool = False, n: int = 4) -> Path:
    for i in range(n):
        make_image(tmp_path / f"{i}.png", (40 + 40 * i, 60, 200 - 40 * i))
    path = tmp_path / "data.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def _read(path):
    from headstart.data.datasets import read_csv
    return read_csv(path)


def test_a_bom_before_the_header_is_not_a_class(tmp_path):
    ds = _read(_csv(tmp_path, "path,label\n0.png,ants\n1.png,bees\n2.png,ants\n3.png,bees\n", bom=True))
    assert ds.classes == ["ants", "bees"]


@pytest.mark.parametrize("header,row", [("filepath,class", "{p},{l}"), ("label,path", "{l},{p}"),
                                        ("category,image,notes", "{l},{p},x"), ("file,label", "{p},{l}")])
def test_header_names_are_recognised_in_any_order(tmp_path, header, row):
    rows = "".join(row.format(p=f"{i}.png", l=("ants", "bees")[i % 2]) + "\n" for i in range(4))
    ds = _read(_csv(tmp_path, header + "\n" + rows))
    assert ds.classes == ["ants", "bees"]
    assert [(Path(p).name, y) for p, y in ds.samples] == [(f"{i}.png", i % 2) for i in range(4)]


def test_an_unknown_header_is_refused_and_shown(tmp_path, capsys):
    path = _csv(tmp_path, "picture,kind\n0.png,ants\n1.png,bees\n")
    assert main(["train", str(path), "--out", str(tmp_path / "run"), *FAST_CLI]) == 1
    assert "['picture', 'kind']" in _one_line(capsys)


def test_an_empty_label_is_refused_with_the_row_number(tmp_path, capsys):
    path = _csv(tmp_path, "path,label\n0.png,ants\n1.png,bees\n2.png,\n3.png,bees\n")
    assert main(["train", str(path), "--out", str(tmp_path / "run"), *FAST_CLI]) == 1
    err = _one_line(capsys)
    assert "line 4" in err and "'2.png'" in err and "empty" in err


def test_labels_are_normalised_and_case_clashes_refused(tmp_path, capsys):
    decomposed = "cafe\u0301"  # é as e + combining accent: looks like the composed "café"
    ds = _read(_csv(tmp_path, f"path,label\n0.png,caf\u00e9\n1.png, bees \n2.png,{decomposed}\n3.png,bees\n"))
    assert ds.classes == ["bees", "caf\u00e9"]
    path = _csv(tmp_path, "path,label\n0.png,ANTS\n1.png,bees\n2.png,ants\n3.png,bees\n")
    assert main(["train", str(path), "--out", str(tmp_path / "run"), *FAST_CLI]) == 1
    err = _one_line(capsys)
    assert "'ANTS'" in err and "'ants'" in err and "differ only in case" in err


def test_class_folders_are_normalised_like_csv_labels(tmp_path):
    from headstart.data.datasets import scan_folder
    for i, name in enumerate(["cafe\u0301", "bees "]):
        make_image(tmp_path / name / "a.png", (40, 60, 200 - 100 * i))
    assert scan_folder(tmp_path).classes == ["bees", "caf\u00e9"]
    make_image(tmp_path / "Bees" / "a.png", (40, 60, 200))
    with pytest.raises(headstart.errors.DatasetError, match="differ only in case"):
        scan_folder(tmp_path)


# -- numbers checked where they enter ---------------------------------------------------------------------
def test_a_diverging_training_stops_at_once_naming_the_learning_rate(image_folder, tmp_path, capsys):
    assert main(["train", str(image_folder), "--out", str(tmp_path / "run"), *FAST_CLI, "--lr", "1e30",
                 "--no-cache"]) == 1
    err = _one_line(capsys)
    assert "loss became nan" in err and "learning rate" in err and "--lr" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("where", ["nan", "inf"])
def test_weights_with_non_finite_values_are_refused(where, trained, tmp_path, capsys):
    root, data, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    state = load_file(str(copy / "model.safetensors"))
    with safe_open(str(copy / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    bias = next(k for k in state if k.endswith("predictions.bias"))
    state[bias][0] = float(where)
    save_file(state, str(copy / "model.safetensors"), metadata=meta)
    assert main(["predict", str(copy), str(make_image(tmp_path / "x.png", (40, 60, 200)))]) == 1
    assert "NaN or infinite" in _one_line(capsys)


def test_json_output_is_strict_json(trained, tmp_path, capsys):
    root, data, run = trained
    only_blue = tmp_path / "ev"
    for i in range(2):
        make_image(only_blue / "blue" / f"{i}.png", (40, 60, 200), seed=i)
    assert main(["evaluate", str(run), str(only_blue), "--format", "json"]) == 0
    out = capsys.readouterr().out

    def refuse(name):
        raise AssertionError(f"bare {name} in JSON output")
    json.loads(out, parse_constant=refuse)


def test_written_json_turns_undefined_metrics_into_null(tmp_path):
    from headstart.io import write_json
    write_json(tmp_path / "m.json", {"recall": float("nan"), "rows": [1.0, float("inf")]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"recall": None, "rows": [1.0, None]}


def test_config_edited_away_from_the_weights_copy_is_refused_naming_both(trained, tmp_path, capsys):
    root, data, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["classes"] = cfg["classes"][::-1]  # swapped: every prediction would flip
    (copy / "config.json").write_text(json.dumps(cfg))
    assert main(["predict", str(copy), str(make_image(tmp_path / "x.png", (40, 60, 200)))]) == 1
    err = _one_line(capsys)
    assert "['red', 'blue']" in err and "['blue', 'red']" in err


# -- the output's disk is measured before training ------------------------------------------------------------
def test_a_full_disk_for_the_run_fails_before_extraction(image_folder, tmp_path, capsys, monkeypatch):
    from conftest import refusing_reads
    import shutil as sh
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 100_000, 100_000))
    with refusing_reads(image_folder):
        assert main(["train", str(image_folder), "--out", str(tmp_path / "run"), *FAST_CLI, "--no-cache"]) == 1
    err = _one_line(capsys)
    assert "needs about" in err and "MB free" in err and "another --out" in err
    assert not (tmp_path / "run").exists()


# -- a run is one consistent thing ----------------------------------------------------------------------------
def test_resume_refuses_checkpoints_of_other_labels(tmp_path, capsys):
    data = make_folder(tmp_path / "d", per_class=3, val_per_class=1)
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), *FAST_CLI, "--keep-checkpoints", "--no-cache"]) == 0
    for split in ("train", "val"):  # the same images, labels swapped
        (data / split / "blue").rename(data / split / "tmp")
        (data / split / "red").rename(data / split / "blue")
        (data / split / "tmp").rename(data / split / "red")
    capsys.readouterr()
    assert main(["train", str(data), "--out", str(out), *FAST_CLI, "--resume", "--no-cache"]) == 1
    err = _one_line(capsys)
    assert "belong to another run" in err and "data" in err and "--overwrite" in err


def test_a_second_writer_to_one_out_is_refused(image_folder, tmp_path, capsys):
    from conftest import refusing_reads
    from headstart.runfolder import run_lock
    out = tmp_path / "run"
    with run_lock(out), refusing_reads(image_folder):
        assert main(["train", str(image_folder), "--out", str(out), *FAST_CLI, "--no-cache"]) == 1
    assert "another headstart is writing" in _one_line(capsys)
    assert not out.exists()
    assert not (tmp_path / ".run.lock").exists()  # the lock file goes with its holder


def test_a_second_writer_through_the_python_api_is_refused(image_folder, tmp_path, trained):
    from conftest import refusing_reads
    from headstart.errors import StorageError
    from headstart.runfolder import run_lock
    out = tmp_path / "run"
    with run_lock(out), refusing_reads(image_folder):
        with pytest.raises(StorageError, match=r"another headstart is writing a run to .*run.*; wait for it to "
                                               r"finish or choose another --out"):
            headstart.ImageClassifier(**SAVED).fit(image_folder, out=out)
        with pytest.raises(StorageError, match="another headstart is writing"):
            headstart.load(trained[2]).save(out)
    assert not out.exists()
    # the lock is its holder's: fit(out=...) then save(out) from one caller take it in turn
    clf = headstart.ImageClassifier(**SAVED).fit(image_folder, out=out)
    assert clf.save(out) == out and headstart.load(out).classes_ == ["blue", "red"]


def test_a_retrain_replaces_the_whole_run_and_keeps_what_headstart_did_not_write(image_folder, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(image_folder), "--out", str(out), *FAST_CLI, "--no-cache", "--no-report"]) == 0
    (out / "model.onnx").write_bytes(b"an export of the first run")
    (out / "report-test.html").write_text("the first run on a test set")
    (out / "heatmaps").mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", str(image_folder), "--out", str(out), *FAST_CLI, "--no-cache", "--overwrite",
                 "--keep-checkpoints", "--heatmaps", "0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "data.json", "history.csv",
                                                    "metrics.json", "model.safetensors", "notes.txt", "plots",
                                                    "report.html"]
    assert (out / "checkpoints" / "run.json").is_file() and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "feature-cache", "run"]  # nothing beside it


def test_temp_files_of_a_killed_save_are_cleaned_at_the_next_start(image_folder, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    left = [out / ".model.safetensors.4242-1.tmp", out / "checkpoints" / ".head.safetensors.4242-1.tmp"]
    for f in left:
        f.write_bytes(b"\0" * 1000)
    assert main(["train", str(image_folder), "--out", str(out), *FAST_CLI, "--no-cache", "--overwrite"]) == 0
    assert not any(f.exists() for f in left)


# -- the pixel budget ----------------------------------------------------------------------------------------
def test_an_image_over_the_pixel_budget_is_skipped_with_the_reason(tmp_path):
    from headstart.data import load_image
    from headstart.errors import ImageReadError
    big = tmp_path / "big.png"
    big.write_bytes(png_header(8000, 6000))  # 48 MP: under Pillow's bomb limit, over headstart's
    with pytest.raises(ImageReadError, match=r"8000x6000 pixels \(48 MP\); expected at most 40 MP"):
        load_image(big)
    data = make_folder(tmp_path / "d", per_class=3, val_per_class=1)
    shutil.copy(big, data / "train" / "blue" / "big.png")
    clf = headstart.ImageClassifier(**SAVED).fit(data)
    assert any("big.png" in str(s) and "40 MP" in str(s) for s in clf.report_.skipped_unreadable)


def test_a_large_png_is_decoded_reduced_and_predicts_as_the_full_picture(tmp_path, trained):
    import numpy as np
    from PIL import Image

    from headstart.data.images import load_pixels
    from headstart.data.transforms import EvalTransform, decode_size
    rng = np.random.default_rng(0)
    small = np.clip(np.array((40, 60, 200)) + rng.normal(0, 40, (6, 8, 3)), 0, 255).astype(np.uint8)
    big = tmp_path / "big.png"
    Image.fromarray(small).resize((4000, 3000), Image.BILINEAR).save(big)  # 12 MP: under the pixel budget
    clf = headstart.load(trained[2])
    cfg = clf.model_.data_config
    handed_on = load_pixels(big, min_size=decode_size(cfg))
    factor = 3000 // (2 * decode_size(cfg))  # the sides stay at least twice what the resize needs
    assert tuple(handed_on.shape) == (3, -(-3000 // factor), -(-4000 // factor)) and factor >= 2  # not 3x3000x4000
    full = EvalTransform(cfg)(load_pixels(big))  # every pixel decoded and kept, as before
    predictor = clf.predictor()
    reduced_p, full_p = (predictor.probabilities_of_batch(x[None])[0] for x in (EvalTransform(cfg)(handed_on), full))
    np.testing.assert_allclose(reduced_p, full_p, atol=0.01)
    assert clf.predict(big) == clf.classes_[int(full_p.argmax())]


def test_an_input_size_whose_forward_batch_outgrows_the_memory_is_refused_before_allocation(image_folder, capsys,
                                                                                            monkeypatch):
    from conftest import refusing_reads
    from headstart import hardware
    from headstart.backbones import registry
    from headstart.backbones.base import Backbone, activation_bytes, check_activation_memory
    per_image = activation_bytes(registry.get("test_tiny"), (1024, 1024))
    assert per_image == (3 * 1024 * 1024 + 8 * 512 * 512) * 4  # its widest layer: the first conv's input and output
    monkeypatch.setattr(hardware, "available_memory", lambda: 10 * per_image)  # one image fits, 32 do not
    probed = []  # the backbone's probe pass is its first forward at the input size
    monkeypatch.setattr(Backbone, "__init__", lambda *a, **k: probed.append(a))
    with refusing_reads(image_folder):
        assert main(["train", str(image_folder), "--out", str(image_folder.parent / "run"), *FAST_CLI, "--no-cache",
                     "--input-size", "1024"]) == 1
    err = _one_line(capsys)
    assert re.search(r"input size 1024x1024 would need about 640 MB for a batch of 32 images through test_tiny "
                     r"\(estimated from its layers\), but 200 MB of memory is available; pass a smaller --input-size "
                     r"\(test_tiny's own is 32x32\)", err), err
    assert probed == []
    check_activation_memory(registry.get("test_tiny"), (1024, 1024), 10)  # what fits passes


# -- the ONNX engine cache is verified ------------------------------------------------------------------------
def test_a_damaged_graph_in_the_onnx_cache_is_exported_again(tmp_path):
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    from headstart.backbones.base import create_backbone
    from headstart.engines import make_runner
    from headstart.features import FeatureCache

    bb = create_backbone("test_tiny").eval()
    cache = FeatureCache(tmp_path / "c" / "features")
    make_runner(bb, "onnx", cache=cache)
    graph = next((tmp_path / "c" / "onnx").glob("*.onnx"))
    model = onnx.load(str(graph))  # one tensor flipped: still a valid graph, now a wrong one
    t = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
    onnx.save(model, str(graph))
    x = torch.rand(3, 3, 32, 32)
    with torch.inference_mode():
        reference = bb.body(x)
    out = make_runner(bb, "onnx", cache=cache)(x)
    assert (out - reference).abs().max().item() <= 1e-4 * reference.abs().max().item() + 1e-6


# -- the race: photos changing while train reads them ----------------------------------------------------------
RACE_RUNS = 20


@pytest.mark.slow
@needs_shared(HYMENOPTERA)
def test_photos_swapped_while_training_never_poison_the_cache(tmp_path):
    """A thread swaps two photos' contents in place (as a sync client or an editor would) while ``fit`` reads
    them; afterwards every cache entry of either content must hold that content's own features."""
    import threading

    from headstart.backbones.base import create_backbone
    from headstart.features import FeatureCache, extract_features

    photos = {c: sorted((HYMENOPTERA / "train" / c).glob("*.jpg"))[:10] for c in ("ants", "bees")}
    data = tmp_path / "d"
    for split, part in (("train", slice(0, 8)), ("val", slice(8, 10))):
        for c, files in photos.items():
            (data / split / c).mkdir(parents=True)
            for f in files[part]:
                shutil.copy(f, data / split / c / f.name)
    a, b = data / "train" / "ants" / photos["ants"][0].name, data / "train" / "bees" / photos["bees"][0].name
    contents = (a.read_bytes(), b.read_bytes())
    bb = create_backbone("test_tiny").freeze().eval()
    pool = "avg" if bb.entry.default_head == "avg" else None
    checked = poisoned = 0
    for run in range(RACE_RUNS):
        cache = FeatureCache(tmp_path / f"cache{run}")
        stop = threading.Event()

        def swap():
            flip = False
            while not stop.is_set():
                for path, content in zip((a, b), contents[::-1] if flip else contents):
                    with open(path, "r+b") as f:  # in place, not renamed in: a reader may see any mix
                        f.truncate(0)
                        f.write(content)
                flip = not flip
        swapper = threading.Thread(target=swap, daemon=True)
        swapper.start()
        try:
            headstart.ImageClassifier(**(FAST | dict(epochs=2, patience=2, seed=run)), cache=cache.root).fit(data)
        finally:
            stop.set()
            swapper.join()
        for content in contents:
            served = extract_features(bb, [content], cache=cache, pool=pool, progress=False)
            fresh = extract_features(bb, [content], cache=None, pool=pool, progress=False)
            if served.cached:
                checked += 1
                poisoned += not torch.allclose(served.features, fresh.features, atol=1e-5)
    assert checked > 0 and poisoned == 0, f"{poisoned} of {checked} entries hold another content's features"


# -- item 3: special files never hang a command -------------------------------------------------------------
@pytest.fixture
def alarm():
    """Fail a call that blocks (a FIFO opened for reading waits for a writer) instead of hanging the suite."""
    import signal

    def ring(_signum, _frame):
        raise TimeoutError("blocked on a special file for 20 s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_predict_on_a_folder_with_a_fifo_and_links_to_devices_skips_them_and_predicts_the_rest(trained, tmp_path,
                                                                                                  capsys, alarm):
    _, data, run = trained
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(next((data / "val" / "red").iterdir()), folder / "photo.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.jpg").symlink_to("/dev/zero")
    (folder / "random.jpg").symlink_to("/dev/urandom")
    assert main(["predict", str(run), str(folder), "--format", "json"]) == 0
    rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert rows["photo.png"].get("error") is None and rows["photo.png"]["label"] in ("blue", "red")
    for name in ("pipe.png", "zero.jpg", "random.jpg"):
        assert "not a regular file" in rows[name]["error"], rows[name]


def test_a_csv_row_naming_a_device_is_skipped_with_the_reason(tmp_path, capsys, alarm):
    data = make_folder(tmp_path / "d", per_class=3, val_per_class=1)
    rows = [f"{p},{p.parent.name}" for p in sorted((data / "train").rglob("*.png"))] + ["/dev/zero,red"]
    (tmp_path / "data.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    assert main(["train", str(tmp_path / "data.csv"), "--out", str(tmp_path / "run"), *FAST_CLI,
                 "--no-report"]) == 0
    skipped = json.loads((tmp_path / "run" / "data.json").read_text())
    assert "/dev/zero" in json.dumps(skipped) and "not a regular file" in json.dumps(skipped)


def test_a_run_whose_weights_are_a_fifo_is_one_line(trained, tmp_path):
    # in a child process: a read blocked inside safetensors' native code does not see an alarm
    import subprocess
    import sys

    _, data, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "model.safetensors").unlink()
    os.mkfifo(copy / "model.safetensors")
    image = next((data / "val" / "red").iterdir())
    try:
        done = subprocess.run([sys.executable, "-m", "headstart", "predict", str(copy), str(image)],
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("predict blocked on a run whose model.safetensors is a FIFO")
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1 and err[-1].startswith("error: ") and "model.safetensors" in err[-1], err


# -- item 10: small inputs that would cost gigabytes -------------------------------------------------------
def test_a_jpeg_followed_by_a_gigabyte_of_trailing_bytes_is_refused_from_its_size(trained, tmp_path, capsys):
    _, data, run = trained
    photo = tmp_path / "padded.jpg"
    make_image(photo, (200, 30, 30), fmt="JPEG")
    with open(photo, "r+b") as f:
        f.truncate(2**30)  # sparse: a gigabyte on paper, nothing on the disk
    assert main(["predict", str(run), str(photo), "--format", "json"]) == 1
    captured = capsys.readouterr()
    [row] = json.loads(captured.out)
    assert "1074 MB" in row["error"] and "HEADSTART_MAX_IMAGE_MB" in row["error"]
    assert captured.err.strip().splitlines()[-1].startswith("error: ")


def test_a_config_naming_a_huge_backbone_the_weights_do_not_hold_is_refused_before_building_it(trained, tmp_path,
                                                                                                monkeypatch):
    _, _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    rewrite_config(copy, _set("backbone.name", "timm:vit_huge_patch14_224"))  # 632M parameters, 2.5 GB

    def build(*_args, **_kwargs):
        raise AssertionError("the backbone was built before its tensors were checked against the weights")

    monkeypatch.setattr("headstart.runs.create_backbone", build)
    with pytest.raises(headstart.errors.RunFormatError, match="do not hold the backbone its config names"):
        headstart.load(copy)


def test_a_damaged_export_is_one_line_that_never_says_to_delete_it(tmp_path, capsys):
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"\x08\x07" + bytes(range(256)) * 8)
    make_image(tmp_path / "x.png", (200, 30, 30))
    assert main(["predict", str(broken), str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "headstart export" in err[-1] and "delete" not in err[-1], err


def test_a_read_only_cache_that_holds_every_feature_still_trains(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "d", per_class=3, val_per_class=1)
    cache = tmp_path / "cache"
    headstart.ImageClassifier(**SAVED | dict(cache=str(cache))).fit(data)

    def read_only(*_args, **_kwargs):  # root writes through chmod, so the refusal is the file system's, modelled
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr("headstart.cache.tempfile.mkstemp", read_only)
    clf = headstart.ImageClassifier(**SAVED | dict(cache=str(cache))).fit(data)
    assert sum(clf.report_.backbone_passes.values()) == 0 and sum(clf.report_.from_cache.values()) > 0


def test_a_class_with_no_validation_image_is_warned_about(tmp_path, caplog):
    data = make_folder(tmp_path / "d", classes=("blue", "green", "red"), per_class=3, val_per_class=1)
    shutil.rmtree(data / "val" / "green")
    with caplog.at_level("WARNING", logger="headstart"):
        headstart.ImageClassifier(**SAVED).fit(data)
    [warning] = [r.getMessage() for r in caplog.records if "no readable validation image" in r.getMessage()]
    assert "'green'" in warning and "'blue'" not in warning
