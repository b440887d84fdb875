"""The CLI's error contract: one line saying what to do, exit codes 0 / 1 / 2 / 130, ``--debug`` tracebacks,
and doomed runs refused before the long work starts."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import headstart
from conftest import FAST_CLI, refusing_reads, weights_file
from headstart.cli import build_parser, error_message, main
from headstart.errors import DatasetError, HeadstartError


@pytest.fixture
def no_extraction(image_folder):
    """Fails the test if feature extraction (the long work, which starts by reading the images) starts."""
    with refusing_reads(image_folder):
        yield


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_help_documents_the_exit_codes():
    text = build_parser().format_help()
    for code, meaning in (("0", "ok"), ("1", "failure"), ("2", "usage"), ("130", "interrupted")):
        assert any(line.split()[:1] == [code] and meaning in line for line in text.splitlines()), code
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "130" in readme and "--debug" in readme


def test_usage_errors_exit_2(capsys):
    for argv in (["train"], ["train", "d", "--out", "r", "--no-such-option"], ["frobnicate"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_output_below_a_file_fails_before_extraction(tmp_path, image_folder, capsys, no_extraction):
    (tmp_path / "taken").write_text("a file, not a folder")
    assert main(["train", str(image_folder), "--out", str(tmp_path / "taken" / "run"), *FAST_CLI]) == 1
    err = _one_error_line(capsys)
    assert "is a file, not a folder" in err and "Choose another --out" in err


def test_unwritable_output_fails_before_extraction_and_leaves_no_trace(tmp_path, image_folder, capsys,
                                                                        monkeypatch, no_extraction):
    parent = tmp_path / "readonly"
    parent.mkdir()

    def denied(dir=None, prefix=None, **k):  # a read-only folder, as root would not see it through chmod
        raise PermissionError(errno.EACCES, "Permission denied", dir)
    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    assert main(["train", str(image_folder), "--out", str(parent / "a" / "run"), *FAST_CLI]) == 1
    err = _one_error_line(capsys)
    assert f"{str(parent)!r} is not writable" in err and "Permission denied" in err
    assert list(parent.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_fails_before_extraction(tmp_path, image_folder, capsys, no_extraction):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["train", str(image_folder), "--out", str(ro / "run"), *FAST_CLI]) == 1
    finally:
        ro.chmod(0o700)
    assert "is not writable" in _one_error_line(capsys)


def test_a_writable_output_check_leaves_no_trace(tmp_path):
    headstart.runs.check_output_folder(tmp_path / "new" / "run")
    assert list(tmp_path.iterdir()) == []


def test_weights_that_do_not_fit_fail_before_extraction(tmp_path, image_folder, capsys, no_extraction):
    wrong = tmp_path / "resnet-ish.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, str(wrong))
    assert main(["train", str(image_folder), "--out", str(tmp_path / "run"), *FAST_CLI, "--weights", str(wrong)]) == 1
    err = _one_error_line(capsys)
    assert "test_tiny" in err and "this backbone" in err
    assert not (tmp_path / "run").exists()


def test_no_room_for_the_cache_fails_before_extraction(tmp_path, image_folder, capsys, monkeypatch, no_extraction):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1_000, 1_000))
    weights = weights_file(tmp_path / "w.safetensors")
    assert main(["train", str(image_folder), "--out", str(tmp_path / "run"), *FAST_CLI, "--cache",
                 str(tmp_path / "c"), "--weights", str(weights)]) == 1
    err = _one_error_line(capsys)
    assert "needs about" in err and "24 images" in err and "--no-cache" in err


def test_interrupt_exits_130_with_a_note(tmp_path, image_folder, capsys, monkeypatch):
    def interrupted(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(headstart.api.ImageClassifier, "fit", interrupted)
    assert main(["train", str(image_folder), "--out", str(tmp_path / "run"), *FAST_CLI]) == 130
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize("exc,expected", [
    (HeadstartError("first line\n  second line"), "error: first line second line"),
    (OSError(errno.ENOSPC, "No space left on device", "/x/y"), "no space left on the device (/x/y)"),
    (PermissionError(errno.EACCES, "Permission denied", "/x/y"), "permission denied: /x/y; fix its permissions"),
    (MemoryError(), "smaller --batch-size"),
])
def test_error_messages_are_one_line_with_the_fix(exc, expected):
    msg = error_message(exc)
    assert msg.startswith("error: ") and "\n" not in msg and expected in msg


def test_an_os_error_mid_run_is_one_line(tmp_path, image_folder, capsys, monkeypatch):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "model.safetensors"))
    monkeypatch.setattr(headstart.api.ImageClassifier, "fit", full)
    assert main(["train", str(image_folder), "--out", str(tmp_path / "run"), *FAST_CLI]) == 1
    assert "no space left on the device" in _one_error_line(capsys)


def test_debug_shows_the_traceback(tmp_path):
    env = os.environ | {"PYTHONPATH": str(Path(headstart.__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "headstart.cli", "train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]
    plain = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and plain.stderr.strip().splitlines() == [plain.stderr.strip()]
    assert plain.stderr.startswith("error: Data folder") and "Traceback" not in plain.stderr
    debug = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], env=env, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "headstart.errors.DatasetError: Data folder" in debug.stderr


def test_debug_reraises_in_process(tmp_path):
    with pytest.raises(DatasetError):
        main(["--debug", "train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")])
