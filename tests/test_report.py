"""The run report: written by every `headstart train` (a failure there is a warning, never a lost model), made for
any labelled data by `headstart report`, and readable in a real browser offline, with JavaScript on or off."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import headstart
from conftest import FAST_CLI, make_folder, make_image
from headstart.cli import main
from headstart.report import Predictions, build_report, calibration, most_confused, top_losses
from report_page import CHROMIUM, SECTIONS, assert_readable, open_report

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Chromium at /usr/bin/chromium")


def _train(data: Path, run: Path, *extra) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    logging.getLogger("headstart").addHandler(handler)
    try:
        with contextlib.redirect_stdout(out):
            code = main(["train", str(data), "--out", str(run), *FAST_CLI, "--cache", str(run.parent / "cache"),
                         *extra])
    finally:
        logging.getLogger("headstart").removeHandler(handler)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A run on generated images with one unreadable file, a grey placeholder and a train image copied into val."""
    root = tmp_path_factory.mktemp("report")
    data = make_folder(root / "data", classes=("blue", "red", "green"))
    (data / "train" / "red" / "broken.jpg").write_bytes(b"not a jpeg at all")
    Image.new("RGB", (40, 32), (128, 128, 128)).save(data / "train" / "red" / "placeholder.png")
    shutil.copy(data / "train" / "blue" / "blue_0.png", data / "val" / "blue" / "again.png")
    code, stdout, stderr = _train(data, root / "run")
    assert code == 0, stderr
    return SimpleNamespace(root=root, data=data, run=root / "run", stdout=stdout)


def _body(html: str) -> str:
    """The report without its footer (how long it took) and the row saying where its probabilities came from."""
    return re.sub(r"<tr><th>this evaluation</th>.*?</tr>", "", html.split("<footer>")[0])


def test_train_writes_the_report_and_its_plots_and_prints_where(tiny):
    report = tiny.run / "report.html"
    assert f"report: {report}" in tiny.stdout
    assert sorted(p.name for p in (tiny.run / "plots").glob("*.png")) == [
        "confusion_matrix.png", "confusion_matrix_normalised.png", "learning_curves.png", "reliability.png"]
    html = report.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html and "<script" not in html
    metrics = json.loads((tiny.run / "metrics.json").read_text())["val"]
    assert f"accuracy <b>{metrics['accuracy']:.4f}</b>" in html
    for name in ("broken.jpg", "placeholder.png", "again.png"):  # skipped, suspect, in train and val
        assert name in html, name
    # each of the 13 validation images is a top loss (the gallery holds 16), each with its heatmap
    assert html.count('alt="heatmap of') == 13 and "Likely label errors" in html


@needs_chromium
def test_the_report_opens_offline_in_a_browser_with_every_picture_and_section(tiny, tmp_path):
    seen = open_report(tiny.run / "report.html", tmp_path / "report.png")
    assert_readable(seen)
    text = seen["no_js"]["text"]
    assert "broken.jpg" in text and "placeholder.png" in text and "again.png" in text
    alts = [i["alt"] for i in seen["images"]]
    assert "learning curves: loss and accuracy per epoch" in alts and "reliability diagram" in alts
    assert any(a.endswith("again.png") for a in alts) and any(a.endswith("placeholder.png") for a in alts)


def test_the_report_of_the_run_later_is_the_one_train_wrote(tiny, tmp_path):
    # train hands its validation probabilities over; `headstart report RUN` computes them from the saved model
    written = _body((tiny.run / "report.html").read_text(encoding="utf-8"))
    out = tmp_path / "again.html"
    assert main(["report", str(tiny.run), "--out", str(out)]) == 0
    assert _body(out.read_text(encoding="utf-8")) == written


def test_report_on_other_data_evaluates_the_run_on_it(tiny, tmp_path, capsys):
    other = make_folder(tmp_path / "new", classes=("blue", "red", "green"), seed=7)
    assert main(["report", str(tiny.run), str(other / "val")]) == 0
    path = tiny.run / "report-val.html"
    assert f"report: {path}" in capsys.readouterr().out
    assert (tiny.run / "plots" / "val" / "confusion_matrix.png").is_file()
    accuracy = headstart.load(tiny.run).evaluate(other / "val")["accuracy"]
    html = path.read_text(encoding="utf-8")
    assert f"accuracy <b>{accuracy:.4f}</b>" in html and "evaluated on: " + str(other / "val") in html


def test_a_failing_report_is_a_warning_and_the_run_is_saved(tmp_path, monkeypatch, image_folder):
    def broken(*args, **kwargs):
        raise RuntimeError("the plotting library broke")

    monkeypatch.setattr("headstart.report.plots.learning_curves", broken)
    code, stdout, stderr = _train(image_folder, tmp_path / "run")
    assert code == 0
    assert "the report was not written (RuntimeError: the plotting library broke)" in stderr
    assert not (tmp_path / "run" / "report.html").exists() and "saved to" in stdout
    photo = make_image(tmp_path / "x.png", (40, 60, 200), seed=3)
    assert headstart.load(tmp_path / "run").predict(photo) in {"blue", "red"}


def test_no_report_skips_it(tmp_path, image_folder):
    code, stdout, _ = _train(image_folder, tmp_path / "run", "--no-report")
    assert code == 0 and not (tmp_path / "run" / "report.html").exists() and "report:" not in stdout


def test_a_negative_heatmaps_count_fails_before_training(tmp_path, image_folder, capsys):
    assert main(["train", str(image_folder), "--out", str(tmp_path / "run"), *FAST_CLI, "--heatmaps", "-1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: heatmaps must be a whole number of at least 0, got -1 (--heatmaps)"
    assert not (tmp_path / "run").exists()


def test_report_errors_are_one_line(tiny, tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "is not a headstart run" in err and "\n" not in err
    other = make_folder(tmp_path / "cats", classes=("blue", "red"))
    shutil.move(other / "val" / "red", other / "val" / "cats")
    assert main(["report", str(tiny.run), str(other / "val")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "cats" in err and "\n" not in err


def test_an_older_run_without_val_labels_takes_them_from_the_folders(tiny, tmp_path):
    run = tmp_path / "old" / "run"
    shutil.copytree(tiny.run, run)
    data = json.loads((run / "data.json").read_text())
    del data["val_labels"]
    (run / "data.json").write_text(json.dumps(data))
    written = _body((tiny.run / "report.html").read_text(encoding="utf-8"))
    assert _body(build_report(run).read_text(encoding="utf-8")).replace(str(run), str(tiny.run)) == written


def test_overlays_go_beside_the_first_top_losses(tiny, tmp_path):
    overlay = Image.new("RGB", (32, 32), (255, 0, 0))
    html = build_report(tiny.run, out=tmp_path / "r.html", overlays=[overlay] * 5, heatmaps=3).read_text()
    assert html.count('alt="heatmap of') == 3 and "a heatmap (LayerCAM) of where the model looked" in html
    assert 'alt="heatmap of' not in build_report(tiny.run, out=tmp_path / "s.html", heatmaps=0).read_text()


# -- the figures, on predictions whose answers are known --------------------------------------------------------

def _predictions(probs, labels, classes=("a", "b", "c")) -> Predictions:
    probs = np.asarray(probs, dtype=np.float32)
    return Predictions([f"img{i}.png" for i in range(len(probs))], np.asarray(labels), probs, list(classes), "test")


def test_top_losses_are_the_lowest_probabilities_of_the_true_class_and_skip_unread_images():
    preds = _predictions([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [np.nan] * 3, [0.6, 0.3, 0.1]], [0, 0, 1, 1])
    rows = top_losses(preds, 3)
    assert [r["path"] for r in rows] == ["img1.png", "img3.png", "img0.png"]
    assert rows[0]["true"] == "a" and rows[0]["predicted"] == "b" and rows[0]["probability"] == pytest.approx(0.7)
    assert rows[0]["p_true"] == pytest.approx(0.2) and rows[0]["loss"] == pytest.approx(-np.log(0.2), rel=1e-5)


def test_most_confused_pairs_come_off_the_diagonal_largest_first():
    pairs = most_confused([[5, 3, 0], [1, 4, 0], [0, 6, 2]], ["a", "b", "c"])
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [("c", "b", 6), ("a", "b", 3), ("b", "a", 1)]
    assert pairs[0]["share"] == pytest.approx(0.75)


def test_the_calibration_error_of_an_overconfident_model():
    # every prediction at confidence 0.9, right half of the time: ECE = |0.5 - 0.9| = 0.4
    probs = [[0.9, 0.05, 0.05]] * 10
    cal = calibration(_predictions(probs, [0, 1] * 5))
    assert cal["ece"] == pytest.approx(0.4, abs=1e-6) and cal["count"] == [10] and cal["accuracy"] == [0.5]
    right = calibration(_predictions([[0.9, 0.05, 0.05]] * 9 + [[0.05, 0.9, 0.05]], [0] * 9 + [0]))
    assert right["ece"] == pytest.approx(0.0, abs=1e-6)


def test_a_fine_tuned_run_shows_its_stage(tiny, tmp_path):
    run = tmp_path / "tuned" / "run"
    shutil.copytree(tiny.run, run)
    lines = (run / "history.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [dict(zip(lines[0].split(","), r.split(","))) for r in lines[1:]]
    for row in rows:
        row["best"] = "False"
    tuned = [dict(rows[-1], epoch=str(len(rows) + i + 1), stage="finetune", best=str(i == 1)) for i in range(3)]
    (run / "history.csv").write_text("\n".join([",".join(header)] + [",".join(r[k] for k in header)
                                                                      for r in rows + tuned]) + "\n")
    html = build_report(run).read_text()
    assert "the shaded band is the fine-tuning stage" in html
    assert f"epoch {len(rows) + 2} of {len(rows) + 3} (finetune stage)" in html
    assert "fine-tuning stage" not in (tiny.run / "report.html").read_text()


def test_a_failing_heatmap_costs_the_heatmaps_only(tiny, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no gradients today")

    monkeypatch.setattr("headstart.explain.explain", broken)
    html = build_report(tiny.run, out=tmp_path / "r.html").read_text()
    assert 'alt="heatmap of' not in html and "Top losses" in html
    assert "the report has no heatmaps (RuntimeError: no gradients today)" in caplog.text


def test_likely_label_errors_and_duplicates_across_classes_are_shown_with_thumbnails(tiny, tmp_path):
    run = tmp_path / "flagged" / "run"
    shutil.copytree(tiny.run, run)
    data = json.loads((run / "data.json").read_text())
    red, blue = tiny.data / "train" / "red" / "red_3.png", tiny.data / "train" / "blue" / "blue_2.png"
    data["label_errors"] = [{"path": str(red), "given": "red", "suggested": "blue", "quality": 0.02, "rank": 1}]
    data["duplicates_across_classes"] = [{"a": str(blue), "b": str(red), "similarity": 0.991,
                                          "labels": ["blue", "red"]}]
    (run / "data.json").write_text(json.dumps(data))
    html = build_report(run, heatmaps=0).read_text()
    assert "Likely label errors (1)" in html and "suggested <span class=\"right\">blue</span>" in html
    assert "blue / red, similarity 0.991" in html
    assert html.count(f'alt="{red}"') == 2 and html.count(f'alt="{blue}"') == 1


def test_the_report_heatmaps_are_those_explain_makes(tiny):
    # explain lets gradients start at the target layer (a faster backward pass): the same maps as LayerCAM with
    # gradients through the whole backbone, from an input that needs them (both smoothed the same way)
    import torch
    from pytorch_grad_cam import LayerCAM

    from headstart.explain import _read, _smooth, explain, target_layer

    clf = headstart.load(tiny.run)
    paths = sorted((tiny.data / "val").glob("*/*.png"))[:4]
    fast = explain(clf, paths)
    model = clf.model_.eval()
    x = torch.stack([_read(path, path.name, model)[1] for path in paths])
    with torch.enable_grad(), LayerCAM(model=model, target_layers=[target_layer(model)]) as cam:
        maps = cam(input_tensor=x.clone().requires_grad_(True), targets=None)
        labels = cam.outputs.argmax(1).tolist()
        cells = cam.activations_and_grads.activations[0].shape[-2:]
    for a, heat, label in zip(fast, maps, labels):
        assert a.label == model.classes[label] and a.heatmap.std() > 0
        np.testing.assert_allclose(a.heatmap, _smooth(heat, cells), atol=1e-4)
