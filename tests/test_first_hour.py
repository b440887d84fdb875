"""A newcomer's first hour on the command line: no silent surprises, honest fine-tuning reports.

Each test is one thing a user hit: a run replaced without a word, a test result never printed, a fine-tune that
made the model worse reported as a success, a checkpoint left behind, ``predict`` exiting 0 on nothing, and so on.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from conftest import make_folder, make_image
from headstart.cli import main

TINY = ["--backbone", "test_tiny", "--epochs", "3", "--engine", "torch"]


def _train(data, out, *extra) -> int:
    return main(["train", str(data), "--out", str(out), *TINY, *extra])


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def run(tmp_path, image_folder) -> Path:
    out = tmp_path / "run"
    assert _train(image_folder, out) == 0
    return out


def test_out_on_an_existing_run_is_refused_unless_overwrite(run, image_folder, capsys):
    capsys.readouterr()
    before = (run / "model.safetensors").read_bytes()
    assert _train(image_folder, run) == 1
    err = _error_line(capsys)
    assert "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert (run / "model.safetensors").read_bytes() == before  # nothing was touched
    assert _train(image_folder, run, "--overwrite", "--seed", "1") == 0
    assert (run / "model.safetensors").read_bytes() != before


def test_the_api_refuses_an_existing_run_too(run, image_folder):
    import headstart
    from headstart.errors import StorageError

    with pytest.raises(StorageError, match="already holds a run"):
        headstart.ImageClassifier(backbone="test_tiny", epochs=2, engine="torch").fit(image_folder, out=run)


def test_the_test_result_is_printed_beside_validation(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=6, val_per_class=3)
    make_folder(tmp_path / "more", per_class=2, val_per_class=0, seed=7)
    (data / "test").symlink_to(tmp_path / "more" / "train")
    assert _train(data, tmp_path / "run") == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert re.search(r"val accuracy \d\.\d{4}", out)
    assert f"test accuracy {metrics['test']['accuracy']:.4f} (4 images)" in out


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _best_rows(run: Path) -> list[dict]:
    return [r for r in _history(run) if r["best"] == "True"]


def test_a_fine_tune_that_does_not_beat_the_head_says_so_with_both_figures(tmp_path, image_folder, capsys):
    # a learning rate that cannot move the weights: no fine-tuning epoch can beat the head-only stage
    assert _train(image_folder, tmp_path / "run", "--strategy", "finetune", "--finetune-epochs", "3",
                  "--finetune-lr", "1e-12", "--views", "1", "--head-search", "off") == 0
    out = capsys.readouterr().out
    best = _best_rows(tmp_path / "run")
    assert len(best) == 1 and best[0]["stage"] == "head"
    assert re.search(rf"best epoch {best[0]['epoch']} of 6 \(head-only stage\): val accuracy \d\.\d{{4}}", out)
    line = next(line for line in out.splitlines() if line.startswith("fine-tuning did not beat"))
    assert len(re.findall(r"val accuracy \d\.\d{4}", out)) >= 2 and "val accuracy" in line
    assert "head-only" in line


def test_a_fine_tune_that_wins_is_the_one_best_epoch_and_says_its_stage(tmp_path, image_folder, capsys):
    # a head stage that barely trains, then a fine-tune that can: the saved epoch is a fine-tuning one
    assert _train(image_folder, tmp_path / "run", "--strategy", "finetune", "--epochs", "1", "--lr", "1e-6",
                  "--finetune-epochs", "6", "--finetune-lr", "1e-3", "--views", "1") == 0
    out = capsys.readouterr().out
    best = _best_rows(tmp_path / "run")
    assert len(best) == 1 and best[0]["stage"] == "finetune", best  # one saved epoch, not one per stage
    epochs = len(_history(tmp_path / "run"))
    assert f"best epoch {best[0]['epoch']} of {epochs} (fine-tuning stage)" in out
    assert "fine-tuning beat the head-only stage's best (epoch 1: val accuracy" in out


def test_checkpoints_of_a_finished_run_are_removed_unless_kept(tmp_path, image_folder):
    ft = ["--strategy", "finetune", "--finetune-epochs", "2", "--views", "1"]
    assert _train(image_folder, tmp_path / "run", *ft) == 0
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert _train(image_folder, tmp_path / "kept", *ft, "--keep-checkpoints") == 0
    assert (tmp_path / "kept" / "checkpoints" / "finetune.safetensors").is_file()


def test_predict_exits_1_when_no_input_could_be_read(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    for paths in ([tmp_path / "nosuchdir"], [tmp_path / "empty"], [bad]):
        capsys.readouterr()
        assert main(["predict", str(run), *map(str, paths)]) == 1, paths
        assert "error:" in capsys.readouterr().err
    good = make_image(tmp_path / "good.png", (200, 50, 40))
    assert main(["predict", str(run), str(bad), str(good)]) == 0  # one readable image: a result, exit 0


@pytest.mark.parametrize("k", ["0", "-1", "two"])
def test_top_k_must_be_at_least_1(run, image_folder, capsys, k):
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run), str(image_folder / "val"), "--top-k", k])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: headstart predict" in err and "--top-k" in err and "at least 1" in err


def test_top_k_below_1_is_refused_by_the_predictor(run, image_folder):
    import headstart
    from headstart.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 1"):
        headstart.load(run).predictor().predict([image_folder / "val"], top_k=0)


def test_evaluate_on_data_without_class_folders_is_one_line(run, tmp_path, capsys):
    loose = tmp_path / "loose"
    for i in range(3):
        make_image(loose / f"img_{i}.png", (200, 50, 40), seed=i)
    (tmp_path / "empty").mkdir()
    for data in (loose, tmp_path / "empty"):
        capsys.readouterr()
        assert main(["evaluate", str(run), str(data)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and "class folders" in err[0], err
        assert "headstart predict" in err[0]


def test_evaluate_on_a_split_tree_names_the_split_to_pass(run, image_folder, capsys):
    capsys.readouterr()
    assert main(["evaluate", str(run), str(image_folder)]) == 1
    assert str(image_folder / "val") in _error_line(capsys)


def test_summary_of_a_mistyped_backbone_is_one_error_with_a_suggestion(capsys, caplog):
    caplog.set_level("INFO", logger="headstart")
    assert main(["summary", "efficentnet_lite0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    said = err + [r.getMessage() for r in caplog.records]
    errors = [line for line in said if "Unknown backbone" in line]
    assert len(errors) == 1, said  # one error, not a warning about random weights and then the error
    assert errors[0].startswith("error: Unknown backbone 'efficentnet_lite0'. Did you mean 'efficientnet_lite0'?")
    assert not [line for line in said if "random weights" in line]


def test_demo_starts_from_a_clean_folder(tmp_path, capsys):
    from headstart.demo import run_demo

    out = tmp_path / "demo"
    run_demo(out, per_class=4, backbone="test_tiny")
    run_demo(out, per_class=2, backbone="test_tiny")  # fewer images: an earlier demo's must not linger
    assert len(list((out / "digits" / "train").rglob("*.png"))) == 20
    report = json.loads((out / "run" / "data.json").read_text())
    assert report["train_val_duplicates"] == [] and sum(report["train_counts"].values()) == 20
    mine = tmp_path / "mine"
    make_image(mine / "holiday.jpg", (10, 20, 30), fmt="JPEG")
    capsys.readouterr()
    assert main(["demo", "--out", str(mine), "--backbone", "test_tiny", "--per-class", "2"]) == 1
    assert "not empty" in _error_line(capsys) and (mine / "holiday.jpg").is_file()


def test_tta_counts_its_mirrored_passes(run, image_folder, capsys, caplog):
    caplog.set_level("INFO", logger="headstart")
    capsys.readouterr()
    assert main(["evaluate", str(run), str(image_folder / "val"), "--tta", "--format", "json", "--engine",
                 "torch"]) == 0
    m = json.loads(capsys.readouterr().out)
    said = caplog.text
    # the plain views come from the cache training filled; the mirrored ones go through the backbone
    assert m["views"] == 2 and m["backbone_passes"] == 8 and m["from_cache"] == 8, m
    assert "8 images x 2 views" in said and "8 through the backbone, 8 from the cache" in said


def test_run_files_share_one_permission_mode(run):
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in run.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes
    assert "model.safetensors" in modes


@pytest.mark.slow  # several processes: runs in the slow tier
def test_log_lines_never_land_inside_a_progress_bar(tmp_path, image_folder):
    """In a terminal (a pty), a log line written while a bar is drawn gets a line of its own."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # bars need a width
    # the default engine exports the backbone to ONNX inside the first extraction bar, logging as it does
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from headstart.cli import main; sys.exit(main())",
                             "train", str(image_folder), "--out", str(tmp_path / "run"), "--backbone", "test_tiny",
                             "--epochs", "3"], stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "img/s]" in text  # bars were drawn
    shown = [segment.rstrip("\r").split("\r")[-1] for segment in text.split("\n")]  # what each line shows
    export = [line for line in shown if "exporting test_tiny to ONNX" in line]
    assert export and all(line.startswith("exporting") for line in export), export


def test_a_run_stopped_before_its_first_checkpoint_can_be_run_again_as_it_was(tmp_path):
    from headstart.errors import StorageError
    from headstart.runfolder import check_new_run

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "run.json").write_text("{}")  # what a killed extraction leaves
    check_new_run(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "finetune.safetensors").write_bytes(b"")
    with pytest.raises(StorageError, match="already holds a run"):
        check_new_run(tmp_path / "run")
