"""Loading a run never trusts it: only the run's own two files are opened (no path from its JSON), a config
that disagrees with its weights or asks for absurd sizes is refused before anything is built, and damaged
or foreign files give a clear ``RunFormatError``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import headstart
import headstart.runs
from conftest import FAST, make_folder, recording_opens, weights_file
from headstart.errors import RunFormatError

SAVED = FAST | dict(epochs=3, patience=3, cache=False)  # a run to load; what it learnt does not matter


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    data = make_folder(root / "d", per_class=3, val_per_class=1)
    two = headstart.ImageClassifier(**SAVED).fit(data).save(root / "two")
    three = headstart.ImageClassifier(**SAVED).fit(make_folder(root / "d3", classes=("blue", "green", "red"),
                                                              per_class=3, val_per_class=1)).save(root / "three")
    return root, two, three


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _edit(run: Path, change, inside_too: bool = False) -> None:
    cfg = json.loads((run / "config.json").read_text())
    change(cfg)
    (run / "config.json").write_text(json.dumps(cfg))
    if inside_too:
        from safetensors import safe_open
        with safe_open(str(run / "model.safetensors"), "pt") as f:
            meta = dict(f.metadata() or {})
        save_file(load_file(str(run / "model.safetensors")), str(run / "model.safetensors"),
                  metadata=meta | {"config": json.dumps(cfg)})


def test_paths_in_a_crafted_config_are_never_opened(runs, tmp_path, monkeypatch):
    root, two, three = runs
    run = _copy(two, tmp_path / "run")
    decoy = _copy(three, tmp_path / "outside")  # a sound run next to it, with other weights

    def craft(cfg):
        for key in ("weights", "weights_file", "model_file", "path"):
            cfg[key] = str(decoy / "model.safetensors")
        cfg["backbone"]["weights_source"] = f"file:{decoy / 'model.safetensors'}"
        cfg["backbone"]["weights_path"] = "../outside/model.safetensors"
        cfg["training"]["checkpoint"] = "../outside/model.safetensors"
        cfg["head"]["weights"] = "/etc/passwd"
    _edit(run, craft, inside_too=True)  # a careful forger: config.json and the copy inside the weights agree
    real_load_file = headstart.runs.load_file  # safetensors opens files in Rust, out of the audit hook's sight
    with recording_opens() as opened:
        def load_file(path, *a, **k):
            opened.append(str(path))
            return real_load_file(path, *a, **k)
        monkeypatch.setattr(headstart.runs, "load_file", load_file)
        clf = headstart.load(run)
    assert clf.classes_ == ["blue", "red"]  # the run's own weights, not the decoy's three classes
    ours = [p for p in opened if str(tmp_path) in p or p.startswith("/etc")]
    assert ours and all(Path(p).parent == run for p in ours), ours
    assert {Path(p).name for p in ours} == {"config.json", "model.safetensors"}


def _strip_embedded_config(run: Path) -> None:
    """Rewrite the weights without the config they carry, as a hand-made or older file would be."""
    state = load_file(str(run / "model.safetensors"))
    save_file(state, str(run / "model.safetensors"), metadata={"format": "headstart-model"})


def test_weights_from_another_save_bring_their_own_config_or_are_refused(runs, tmp_path, caplog):
    root, two, three = runs
    run = _copy(two, tmp_path / "run")
    shutil.copy(three / "model.safetensors", run / "model.safetensors")
    assert headstart.load(run).classes_ == ["blue", "green", "red"]  # the weights' own classes, never two's
    assert "from another save" in caplog.text
    _strip_embedded_config(run)
    with pytest.raises(RunFormatError, match="come from different saves"):
        headstart.load(run)
    _edit(run, lambda c: c.pop("model_digest"))  # a run saved before the digest was recorded
    with pytest.raises(RunFormatError, match=r"do not match its config: head.layers.predictions.weight is \(3, "):
        headstart.load(run)


def test_a_head_from_another_save_cannot_shift_labels(tmp_path):
    """Same backbone, same shapes, other classes: without the model digest this would load and mislabel."""
    weights = weights_file(tmp_path / "w.safetensors")
    kw = SAVED | {"weights": weights}
    a = headstart.ImageClassifier(**kw).fit(make_folder(tmp_path / "a", classes=("blue", "red"), per_class=3,
                                                        val_per_class=1)).save(tmp_path / "run-a")
    b_data = make_folder(tmp_path / "b", classes=("green", "red"), per_class=3, val_per_class=1)
    b = headstart.ImageClassifier(**kw).fit(b_data).save(tmp_path / "run-b")
    shutil.copy(b / "model.safetensors", a / "model.safetensors")  # as a save killed between the two files
    loaded = headstart.load(a)
    assert loaded.classes_ == ["green", "red"]
    files = sorted((b_data / "val").rglob("*.png"))
    assert loaded.predict(files) == [f.parent.name for f in files]
    _strip_embedded_config(a)
    with pytest.raises(RunFormatError, match="come from different saves"):
        headstart.load(a)


@pytest.mark.parametrize("change,message", [
    (lambda c: c["head"].update(hidden=[10**9]), "hidden layer widths must be whole numbers from 1 to 16384"),
    (lambda c: c["data_config"].update(input_size=[100000, 100000]), "input_size must be two whole numbers from 1 to 4096"),
    (lambda c: c["data_config"].update(std=[1e300, 1, 1]), "std is for pixels scaled to 0..1"),
    (lambda c: c["data_config"].update(weights_file="../x"), "lacks or garbles a field"),
    (lambda c: c.update(classes=["blue", "red", "green"]), r"says classes \['blue', 'red', 'green'\] but the weights were saved with \['blue', 'red'\]"),
    (lambda c: c["backbone"].update(name="../../evil"), "says backbone .*'../../evil'.* but the weights were saved with"),
    (lambda c: c.pop("head"), "lacks or garbles a field"),
    (lambda c: c.update(format_version=2), "run format 2"),
    (lambda c: c.update(format="pickle"), "not a headstart model config"),
])
def test_altered_config_is_a_clear_error(runs, tmp_path, change, message):
    root, two, three = runs
    run = _copy(two, tmp_path / "run")
    _edit(run, change)
    with pytest.raises(RunFormatError, match=message):
        headstart.load(run)


@pytest.mark.parametrize("damage,message", [
    (lambda run: (run / "model.safetensors").write_bytes(b"\x80\x04\x95" + b"pickle" * 10), "missing or damaged"),
    (lambda run: (run / "model.safetensors").unlink(), "missing or damaged"),
    (lambda run: (run / "config.json").write_text("{not json"), "is damaged"),
    (lambda run: (run / "config.json").unlink(), "config.json is missing"),
])
def test_damaged_run_files_are_a_clear_error(runs, tmp_path, damage, message):
    root, two, three = runs
    run = _copy(two, tmp_path / "run")
    damage(run)
    with pytest.raises(RunFormatError, match=message):
        headstart.load(run)
