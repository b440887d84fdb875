"""Real subprocesses: a training killed with SIGKILL in the middle of feature extraction leaves a sound
cache and no half-written output; two trainings sharing one cache at the same time both succeed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import headstart
from conftest import make_folder, random_vgg_weights
from headstart.features import FeatureCache, extract_features

SRC = str(Path(headstart.__file__).resolve().parents[1])

# trains on DATA with a shared weights file and cache, writing the run to OUT. With a pause, every cache
# write sleeps after the entry's bytes are on disk and before the rename: the moment a kill would hurt most.
TRAIN = r"""
import sys, time
from pathlib import Path
data, weights, cache, out, ready, peer, pause = sys.argv[1:8]
import os, threading, headstart
if float(pause):
    real = os.replace
    def slow(src, dst, *a, **k):
        if threading.current_thread().name.startswith("headstart-cache-write"):
            time.sleep(float(pause))
        return real(src, dst, *a, **k)
    os.replace = slow
Path(ready).touch()
t0 = time.time()
while peer != "-" and not Path(peer).exists() and time.time() - t0 < 120:
    time.sleep(0.01)
clf = headstart.ImageClassifier(backbone="vgg16", weights=weights, input_size=32, epochs=5, batch_size=8,
                                cache=cache, progress=False).fit(data)
clf.save(out)
"""


def _start(tmp_path, data, weights, cache, name, peer="-", pause=0.0):
    ready = tmp_path / f"{name}.ready"
    env = os.environ | {"PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", TRAIN, str(data), str(weights), str(cache), str(tmp_path / name),
                             str(ready), str(peer), str(pause)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, ready


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


def test_sigkill_during_extraction_leaves_a_sound_cache_and_a_rerun_completes(tmp_path):
    data = make_folder(tmp_path / "d", per_class=20, val_per_class=4)
    n = 48
    weights = random_vgg_weights(tmp_path / "w.safetensors")
    cache = tmp_path / "cache"
    proc, _ = _start(tmp_path, data, weights, cache, "run", pause=0.05)
    deadline = time.time() + 120
    while time.time() < deadline and not list(cache.rglob("*.safetensors")):  # the first batch's shard
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stored = _sound_entries(cache)
    assert 1 <= stored < n  # killed in the middle, not before or after
    assert not (tmp_path / "run").exists()  # no half-written run folder

    again = headstart.ImageClassifier(backbone="vgg16", weights=weights, input_size=32, epochs=5, batch_size=8,
                                      cache=cache).fit(data)
    r = again.report_
    assert r.cache_recomputed == [] and r.skipped_unreadable == []
    assert sum(r.from_cache.values()) == stored and sum(r.backbone_passes.values()) == n - stored
    assert _sound_entries(cache) == n
    fresh = extract_features(again.model_.backbone, sorted(data.rglob("*.png")), cache=None).features
    cached = extract_features(again.model_.backbone, sorted(data.rglob("*.png")), FeatureCache(cache))
    assert cached.cached == n
    torch.testing.assert_close(cached.features, fresh, atol=1e-5, rtol=1e-4)
    run = again.save(tmp_path / "run")
    assert headstart.load(run).classes_ == ["blue", "red"]


def test_two_trainings_sharing_one_cache_at_once(tmp_path):
    data = make_folder(tmp_path / "d", per_class=16, val_per_class=4)
    n = 40
    weights = random_vgg_weights(tmp_path / "w.safetensors")
    cache = tmp_path / "cache"
    # each waits for the other to be ready, then both extract and write the same entries at the same time
    a, a_ready = _start(tmp_path, data, weights, cache, "a", peer=tmp_path / "b.ready", pause=0.03)
    b, b_ready = _start(tmp_path, data, weights, cache, "b", peer=a_ready, pause=0.03)
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
    bb = headstart.create_backbone("vgg16", weights=weights, input_size=32)
    fresh = extract_features(bb, files, cache=None).features
    torch.testing.assert_close(extract_features(bb, files, FeatureCache(cache)).features, fresh, atol=1e-5, rtol=1e-4)


# saves two trained models in turn into one run folder until killed; every file write pauses after the rename
SAVE_LOOP = r"""
import sys, time
from pathlib import Path
data_a, data_b, weights, out, ready = sys.argv[1:6]
import headstart, headstart.runs as R
kw = dict(backbone="vgg16", weights=weights, input_size=32, epochs=1, cache=False, progress=False)
a = headstart.ImageClassifier(**kw).fit(data_a)
b = headstart.ImageClassifier(**kw).fit(data_b)
real = R.atomic_write
def slow(path, *args, **k):
    real(path, *args, **k)
    # widen the gap between weights and config; in steps, so time spent stopped does not use it up
    for _ in range(40 if path.name == "model.safetensors" else 1):
        time.sleep(0.01)
R.atomic_write = slow
a.save(out)
Path(ready).touch()
while True:
    b.save(out)
    a.save(out)
"""


def test_a_run_stopped_at_any_point_of_a_save_holds_the_old_model_or_the_new_one(tmp_path):
    weights = random_vgg_weights(tmp_path / "w.safetensors")
    data_a = make_folder(tmp_path / "a", classes=("blue", "red"), per_class=2, val_per_class=1)
    data_b = make_folder(tmp_path / "b", classes=("green", "red"), per_class=2, val_per_class=1)
    out, ready = tmp_path / "run", tmp_path / "ready"
    env = os.environ | {"PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    outcomes, mixed = [], 0
    rng = np.random.default_rng(0)
    proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(data_a), str(data_b), str(weights), str(out),
                             str(ready)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not ready.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    # stop the writer at random moments (SIGSTOP: the files are what a SIGKILL then would leave) and look
    for _ in range(12):
        time.sleep(float(rng.uniform(0.0, 0.1)))
        proc.send_signal(signal.SIGSTOP)
        try:
            for name in ("config.json", "metrics.json", "data.json"):
                json.loads((out / name).read_text())  # every file whole
            loaded = tuple(headstart.load(out).classes_)
            outcomes.append(loaded)
            mixed += loaded != tuple(json.loads((out / "config.json").read_text())["classes"])
        finally:
            proc.send_signal(signal.SIGCONT)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert set(outcomes) <= {("blue", "red"), ("green", "red")}  # the old model or the new one, never a mix
    assert len(outcomes) == 12
    assert mixed >= 1  # some stops fell between the weights and config.json, and were read right
    print("reader saw:", outcomes, "stops between weights and config:", mixed)
    for name in ("config.json", "metrics.json", "data.json"):
        json.loads((out / name).read_text())
