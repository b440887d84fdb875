"""docs/onnx.md's program (onnxruntime, numpy and Pillow only) predicts what ``headstart predict`` predicts from
the same exported file: fast on test_tiny and generated images, slow on efficientnet_lite0 and the
hymenoptera validation photos."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import headstart
from conftest import HYMENOPTERA, make_folder, make_image, needs_shared
from headstart.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "onnx.md"


def _doc_program(tmp_path: Path) -> Path:
    text = DOC.read_text(encoding="utf-8")
    code = re.search(r"tests/test_onnx_doc.py.*?```python\n(.*?)```", text, re.S).group(1)
    path = tmp_path / "predict_onnx.py"
    path.write_text(code, encoding="utf-8")
    return path


def _doc_predictions(tmp_path: Path, model: Path, images: list[Path]) -> dict[str, tuple[str, float]]:
    # only what the page says it needs: a fresh interpreter that must not import headstart or torch
    done = subprocess.run([sys.executable, "-X", "importtime", str(_doc_program(tmp_path)), str(model),
                           *map(str, images)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert not imported & {"headstart", "torch", "timm", "torchvision"}, imported & {"headstart", "torch"}
    rows = [line.rsplit(" ", 2) for line in done.stdout.splitlines()]
    return {path: (label, float(p)) for path, label, p in rows}


def _headstart_predictions(model: Path, folder: Path, capsys) -> dict[str, tuple[str, float]]:
    capsys.readouterr()
    assert main(["--quiet", "predict", str(model), str(folder), "--format", "json"]) == 0
    return {r["path"]: (r["label"], r["probability"]) for r in json.loads(capsys.readouterr().out)
            if r["error"] is None}


def _same_top1(doc: dict, hs: dict) -> None:
    assert doc.keys() == hs.keys() and len(doc) > 0
    different = {p: (doc[p], hs[p]) for p in doc if doc[p][0] != hs[p][0]}
    assert not different, different
    gap = max(abs(doc[p][1] - hs[p][1]) for p in doc)
    assert gap < 0.02, gap


def test_the_page_states_every_metadata_field(tmp_path):
    data = make_folder(tmp_path / "data", per_class=4, val_per_class=1)
    clf = headstart.ImageClassifier(backbone="test_tiny", epochs=2, engine="torch", cache=False, head_search="off").fit(data)
    clf.save(tmp_path / "run")
    assert main(["--quiet", "export", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx")]) == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    page = DOC.read_text(encoding="utf-8")
    for key in meta:
        assert f"| `{key}` |" in page, key
    for key in json.loads(meta["data_config"]):
        assert f"| `{key}` |" in page or f"`{key}`" in page.split("`data_config`:")[1].split("##")[0], key
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
    assert "`images`" in page and "`logits`" in page and "`probabilities`" in page


def test_the_doc_program_agrees_with_headstart_predict(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=6, val_per_class=3)
    val = data / "val"
    # modes the program must prepare as headstart does: transparency, grayscale, a palette, a rotated JPEG
    rgba = np.zeros((30, 36, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 120
    Image.fromarray(rgba, "RGBA").save(val / "red" / "half_transparent.png")
    Image.fromarray(np.full((32, 40), 90, np.uint8), "L").save(val / "blue" / "grey.png")
    Image.open(make_image(tmp_path / "p.png", (40, 60, 200))).convert("P").save(val / "blue" / "palette.png")
    photo = Image.open(make_image(tmp_path / "r.png", (200, 50, 40), size=(48, 30)))
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(val / "red" / "rotated.jpg", exif=exif.tobytes(), quality=95)
    clf = headstart.ImageClassifier(backbone="test_tiny", epochs=10, engine="torch", cache=False, head_search="off").fit(data)
    clf.save(tmp_path / "run")
    model = tmp_path / "model.onnx"
    assert main(["--quiet", "export", str(tmp_path / "run"), "--out", str(model)]) == 0
    images = sorted(p for p in val.rglob("*") if p.is_file())
    _same_top1(_doc_predictions(tmp_path, model, images), _headstart_predictions(model, val, capsys))


@pytest.mark.slow
@needs_shared(HYMENOPTERA)
def test_the_doc_program_agrees_with_headstart_predict_on_the_hymenoptera_photos(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--quiet", "train", str(HYMENOPTERA), "--out", str(run), "--epochs", "10"]) == 0
    model = tmp_path / "model.onnx"
    assert main(["--quiet", "export", str(run), "--out", str(model)]) == 0
    val = HYMENOPTERA / "val"
    photos = sorted(p for p in val.rglob("*") if p.is_file())
    assert len(photos) == 153
    _same_top1(_doc_predictions(tmp_path, model, photos), _headstart_predictions(model, val, capsys))
