"""Real subprocesses: a training killed with SIGKILL in the middle of feature extraction leaves a sound
cache and no half-written output; two trainings sharing one cache at the same time both succeed; a run
stopped at any point of a save holds the old model or the new one.

Each moment that matters is reached by the process itself (it waits, or stops itself, at a file rename), so no
outcome depends on how fast the machine is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import headstart
from conftest import make_folder, weights_file
from headstart.features import FeatureCache, extract_features

SRC = str(Path(headstart.__file__).resolve().parents[1])
ENV = {"PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# Trains on DATA with a shared weights file and cache, writing the run to OUT. The shards stored in the cache
# are watched at their rename (their bytes are on disk, under a temporary name):
#   HOLD (a path, or -): once the first shard has landed, the next one stops before its rename, HOLD is touched,
#     and the process waits there to be killed: the moment a kill would hurt most.
#   MEET (mine:theirs, or -): before its first shard lands, each process touches its file and waits for the
#     other's: both have computed the same first images before either can read them from the cache.
TRAIN = r"""
import os, sys, time
from pathlib import Path
data, weights, cache, out, hold, meet = sys.argv[1:7]
import headstart
real, landed = os.replace, []
def replace(src, dst, *a, **k):
    if Path(dst).parent.parent == Path(cache) and str(dst).endswith(".safetensors"):
        if meet != "-" and not landed:
            mine, theirs = meet.split(":")
            Path(mine).touch()
            t0 = time.time()
            while not Path(theirs).exists() and time.time() - t0 < 120:
                time.sleep(0.01)
        if hold != "-" and landed:
            Path(hold).touch()
            time.sleep(3600)
        landed.append(dst)
    return real(src, dst, *a, **k)
os.replace = replace
clf = headstart.ImageClassifier(backbone="test_tiny", weights=weights, epochs=5, batch_size=8, cache=cache,
                                progress=False).fit(data)
clf.save(out)
"""


def _start(tmp_path, data, weights, cache, name, hold="-", meet="-"):
    return subprocess.Popen([sys.executable, "-c", TRAIN, str(data), str(weights), str(cache), str(tmp_path / name),
                             str(hold), meet], env=os.environ | ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _sound_entries(cache: Path) -> int:
    """Every entry in the cache reads back with a matching digest (else the test fails); returns how many
    images have one."""
    fc = FeatureCache(cache)
    images = set()
    for ns in (p.name for p in cache.iterdir() if p.is_dir()):
        for digest in fc.index(ns):
            assert fc.get(ns, digest) is not None, f"damaged entry {ns}/{digest}: {fc.damage}"
            images.add(digest)
    assert fc.corrupt == [] and not list(cache.glob("*/*/*.safetensors"))  # all in shards
    return len(images)


def _wait_for(path: Path, proc, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.005)


@pytest.mark.slow  # several processes: runs in the slow tier
def test_sigkill_during_extraction_leaves_a_sound_cache_and_a_rerun_completes(tmp_path):
    data = make_folder(tmp_path / "d", per_class=20, val_per_class=4)
    n = 48
    weights = weights_file(tmp_path / "w.safetensors")
    cache = tmp_path / "cache"
    proc = _start(tmp_path, data, weights, cache, "run", hold=tmp_path / "held")
    _wait_for(tmp_path / "held", proc)  # a shard's bytes are written, its rename not yet done
    assert list(cache.rglob("*.tmp"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stored = _sound_entries(cache)
    assert 1 <= stored < n  # killed in the middle, not before or after
    assert not (tmp_path / "run").exists()  # no half-written run folder

    again = headstart.ImageClassifier(backbone="test_tiny", weights=weights, epochs=5, batch_size=8,
                                      cache=cache).fit(data)
    r = again.report_
    assert r.cache_recomputed == [] and r.skipped_unreadable == []
    assert sum(r.from_cache.values()) == stored and sum(r.backbone_passes.values()) == n - stored
    assert _sound_entries(cache) == n
    # what the cache serves is what the backbone computes (test_tiny's averaging head keeps each map's average)
    files = sorted(data.rglob("*.png"))
    fresh = extract_features(again.model_.backbone, files, cache=None, pool="avg").features
    cached = extract_features(again.model_.backbone, files, FeatureCache(cache), pool="avg")
    assert cached.cached == n
    torch.testing.assert_close(cached.features, fresh, atol=1e-5, rtol=1e-4)
    run = again.save(tmp_path / "run")
    assert headstart.load(run).classes_ == ["blue", "red"]


@pytest.mark.slow  # several processes: runs in the slow tier
def test_two_trainings_sharing_one_cache_at_once(tmp_path):
    data = make_folder(tmp_path / "d", per_class=16, val_per_class=4)
    n = 40
    weights = weights_file(tmp_path / "w.safetensors")
    cache = tmp_path / "cache"
    # both compute their first batch before either stores it, then both extract and write the same entries
    a = _start(tmp_path, data, weights, cache, "a", meet=f"{tmp_path / 'a.met'}:{tmp_path / 'b.met'}")
    b = _start(tmp_path, data, weights, cache, "b", meet=f"{tmp_path / 'b.met'}:{tmp_path / 'a.met'}")
    for proc in (a, b):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    reports = [json.loads((tmp_path / name / "data.json").read_text()) for name in ("a", "b")]
    for r in reports:
        assert r["cache_recomputed"] == [] and r["skipped_unreadable"] == [] and r["cache_write_error"] is None
    # they really overlapped: more backbone passes in total than images
    assert sum(sum(r["backbone_passes"].values()) for r in reports) > n
    assert _sound_entries(cache) == n
    assert not list(cache.rglob("*.tmp"))
    files = sorted(data.rglob("*.png"))
    pa, pb = headstart.load(tmp_path / "a").predict_proba(files), headstart.load(tmp_path / "b").predict_proba(files)
    np.testing.assert_allclose(pa, pb, atol=1e-5)
    bb = headstart.create_backbone("test_tiny", weights=weights)
    fresh = extract_features(bb, files, cache=None, pool="avg").features
    cached = extract_features(bb, files, FeatureCache(cache), pool="avg")
    assert cached.cached == n
    torch.testing.assert_close(cached.features, fresh, atol=1e-5, rtol=1e-4)


# Saves two trained models in turn into one run folder until killed. While the file GAP exists, the next save
# stops itself (SIGSTOP) right after its weights have landed and before its config.json does, having removed GAP.
SAVE_LOOP = r"""
import os, signal, sys
from pathlib import Path
data_a, data_b, out, ready, gap = sys.argv[1:6]
import headstart
kw = dict(backbone="test_tiny", epochs=1, cache=False, progress=False)
a = headstart.ImageClassifier(**kw).fit(data_a)
b = headstart.ImageClassifier(**kw).fit(data_b)
real = os.replace
def replace(src, dst, *args, **k):
    real(src, dst, *args, **k)
    if Path(dst).name == "model.safetensors" and Path(dst).parent.parent == Path(out).parent and os.path.exists(gap):
        os.unlink(gap)
        os.kill(os.getpid(), signal.SIGSTOP)
os.replace = replace
a.save(out)
Path(ready).touch()
while True:
    b.save(out)
    a.save(out)
"""


def _read_stopped_run(out: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a reader sees in a run whose writer is stopped: every file whole; (loaded classes, config.json's)."""
    for name in ("config.json", "metrics.json", "data.json"):
        json.loads((out / name).read_text())
    return tuple(headstart.load(out).classes_), tuple(json.loads((out / "config.json").read_text())["classes"])


def _stopped(proc, seconds: float = 180) -> None:
    """Return once ``proc`` is stopped (a stop signal is delivered when the process next runs, not at once)."""
    deadline = time.time() + seconds
    while True:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return
        assert not pid and time.time() < deadline, "the writer ended, or never stopped"
        time.sleep(0.005)


@pytest.mark.slow  # several processes: runs in the slow tier
def test_a_run_stopped_at_any_point_of_a_save_holds_the_old_model_or_the_new_one(tmp_path):
    data_a = make_folder(tmp_path / "a", classes=("blue", "red"), per_class=2, val_per_class=1)
    data_b = make_folder(tmp_path / "b", classes=("green", "red"), per_class=2, val_per_class=1)
    out, ready, gap = tmp_path / "run", tmp_path / "ready", tmp_path / "gap"
    proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(data_a), str(data_b), str(out), str(ready),
                             str(gap)], env=os.environ | ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    models = {("blue", "red"), ("green", "red")}
    try:
        _wait_for(ready, proc)
        # stopped at random moments (SIGSTOP: the files are what a SIGKILL then would leave), then looked at
        rng = np.random.default_rng(0)
        outcomes = []
        for _ in range(12):
            time.sleep(float(rng.uniform(0.0, 0.1)))
            proc.send_signal(signal.SIGSTOP)
            _stopped(proc)
            try:
                outcomes.append(_read_stopped_run(out)[0])
            finally:
                proc.send_signal(signal.SIGCONT)
        assert set(outcomes) <= models  # the old model or the new one, never a mix
        assert len(outcomes) == 12
        # stopped between the new weights and the new config.json: both are in the new run's folder, not yet in
        # place, and the run holds the old model, weights and config.json alike
        for _ in range(3):
            gap.touch()
            _stopped(proc)
            try:
                loaded, config_json = _read_stopped_run(out)
            finally:
                proc.send_signal(signal.SIGCONT)
            assert loaded in models and loaded == config_json
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for name in ("config.json", "metrics.json", "data.json"):
        json.loads((out / name).read_text())


# Saves run A into RUNS/run (with a user's notes.txt and an export of A beside it), then B over it, then A again,
# stopping itself (SIGSTOP) just before and just after every rename under RUNS: every moment between two files
# of a save, and the moments around the swap of the whole folder. REF holds a copy of each run, saved apart.
SAVE_STEPS = r"""
import os, signal, sys
from pathlib import Path
data_a, data_b, runs, ref = sys.argv[1:5]
import headstart
kw = dict(backbone="test_tiny", epochs=1, head_search="off", cache=False, progress=False)
a = headstart.ImageClassifier(**kw).fit(data_a)
b = headstart.ImageClassifier(**kw).fit(data_b)
a.save(Path(ref) / "a")
b.save(Path(ref) / "b")
out = Path(runs) / "run"
a.save(out)
(out / "notes.txt").write_text("mine")
(out / "model.onnx").write_bytes(b"an export of run a")
def stopping(real):
    def rename(src, dst, *args, **k):
        inside = Path(dst).is_relative_to(runs)
        if inside:
            os.kill(os.getpid(), signal.SIGSTOP)
        real(src, dst, *args, **k)
        if inside:
            os.kill(os.getpid(), signal.SIGSTOP)
    return rename
os.replace, os.rename = stopping(os.replace), stopping(os.rename)
b.save(out)
a.save(out)
"""

RUN_PARTS = ("model.safetensors", "config.json", "metrics.json", "history.csv", "data.json")


def _content(path: Path):
    """A run file's content: its bytes; for the weights, the tensors and metadata (their order in the header is
    not fixed)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        return f.metadata(), {k: f.get_tensor(k).tobytes() for k in sorted(f.keys())}


def _which_run(out: Path, ref: Path) -> str:
    """'a' or 'b': the run whose every file ``out`` holds (the test fails on a mix)."""
    held = {name: _content(out / name) for name in RUN_PARTS}
    whose = {name: [r for r in "ab" if held[name] == _content(ref / r / name)] for name in RUN_PARTS}
    matches = [r for r in "ab" if all(r in found for found in whose.values())]
    assert matches, f"a mix of two runs: {whose}"
    return matches[0]


def test_a_save_interrupted_between_any_two_files_leaves_the_old_run_or_the_new_one_whole(tmp_path):
    from headstart.runfolder import run_lock

    data_a = make_folder(tmp_path / "a", classes=("blue", "red"), per_class=2, val_per_class=1)
    data_b = make_folder(tmp_path / "b", classes=("green", "red"), per_class=2, val_per_class=1, seed=1)
    runs, ref = tmp_path / "runs", tmp_path / "ref"
    out = runs / "run"
    proc = subprocess.Popen([sys.executable, "-c", SAVE_STEPS, str(data_a), str(data_b), str(runs), str(ref)],
                            env=os.environ | ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        while seen.count("b") < 6:  # the third save under way: killed there
            _stopped(proc)
            run = _which_run(out, ref)
            seen.append(run)
            assert tuple(headstart.load(out).classes_) == (("blue", "red") if run == "a" else ("green", "red"))
            # the old run's export goes with it; the user's file is kept (in the old folder, during the swap)
            assert (out / "model.onnx").exists() == (seen.count("b") == 0)
            assert (out / "notes.txt").exists() or list(runs.glob(".run.*/notes.txt"))
            proc.send_signal(signal.SIGCONT)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert seen[0] == "a" and seen == sorted(seen)  # the old run whole until the new one whole
    assert _which_run(out, ref) == "b" and (out / "notes.txt").read_text() == "mine"
    assert list(runs.glob(".run.tmp-*"))  # the killed save's half-written folder
    with run_lock(out):  # the next writer's start clears it
        pass
    assert sorted(p.name for p in runs.iterdir()) == ["run"]
    assert _which_run(out, ref) == "b" and (out / "notes.txt").read_text() == "mine"
