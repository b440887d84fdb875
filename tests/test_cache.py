"""The feature cache is checked, not trusted: damaged entries are detected, reported and recomputed;
a doomed cache fails before extraction; a cache that fills up mid-run costs speed, not the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import headstart
from conftest import FAST, disk_full_under, fuzz_examples, make_folder, refusing_reads, weights_file
from headstart.cache import _shard_members
from headstart.errors import StorageError
from headstart.features import FeatureCache, extract_features


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.safetensors"))


def _shard_entries(cache: Path) -> list[tuple[Path, str]]:
    """``(shard, digest)`` for every entry the cache's shards hold."""
    return sorted((s, d) for s in cache.glob("*/*.safetensors") for d in _shard_members(s))


def _damage(path: Path, how: str, entry: str | None = None) -> None:
    data = bytearray(path.read_bytes())
    if how == "flipped":  # one byte of one entry's features changed: still a valid safetensors file
        n = int.from_bytes(data[:8], "little")
        start = json.loads(data[8:8 + n])[entry]["data_offsets"][0] if entry else len(data) - 12
        data[8 + n + start + 1] ^= 0xFF
    elif how == "truncated":  # cut halfway through the tensors, after a whole header
        n = int.from_bytes(data[:8], "little")
        del data[8 + n + (len(data) - 8 - n) // 2:]
    elif how == "garbage":
        data = bytearray(b"\x00" * 8 + b"not a header")
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training that filled a cache: (data, its keyword arguments, the classifier, the cache)."""
    root = tmp_path_factory.mktemp("trained")
    data = make_folder(root / "d", per_class=3, val_per_class=1)
    kw = FAST | {"weights": weights_file(root / "w.safetensors"), "cache": root / "cache"}
    return data, kw, headstart.ImageClassifier(**kw).fit(data), root / "cache"


@pytest.mark.parametrize("how", ["flipped", "truncated", "garbage", "empty"])
def test_damaged_entry_is_detected_reported_and_recomputed(trained, tmp_path, how):
    """One entry's bytes changed: that image alone is recomputed. A shard cut short: each image it held is
    named and recomputed. A shard whose header is gone: its images are recomputed and the shard is reported."""
    data, kw, first, pristine = trained
    cache = shutil.copytree(pristine, tmp_path / "cache")
    kw = kw | {"cache": cache}
    entries = _shard_entries(cache)
    assert len(entries) == 8 and first.report_.cache_recomputed == []
    shard = max({s for s, _ in entries}, key=lambda s: sum(x == s for x, _ in entries))  # the train batch's
    members = [d for s, d in entries if s == shard]
    victim, ns = members[1], shard.parent.name
    original = {d: FeatureCache(cache).get(ns, d) for d in members}
    _damage(shard, how, victim)

    again = headstart.ImageClassifier(**kw).fit(data)
    recomputed = again.report_.cache_recomputed
    passes = again.report_.backbone_passes["train"] + again.report_.backbone_passes["val"]
    if how == "flipped":
        assert [r["entry"] for r in recomputed] == [f"{shard}#{victim}"] and passes == 1
    elif how == "truncated":
        assert sorted(r["entry"] for r in recomputed) == sorted(f"{shard}#{d}" for d in members)
        assert passes == len(members) > 1
    else:
        assert [(r["image"], r["entry"]) for r in recomputed] == [(None, str(shard))] and passes == len(members)
    assert all(r["reason"] for r in recomputed)
    assert all(r["image"] is None or Path(r["image"]).is_file() for r in recomputed)
    # the recomputed entries are sound again and hold the features the first run stored (up to the float
    # noise of another batch), so the model is the one the first run trained
    for d, features in original.items():
        torch.testing.assert_close(FeatureCache(cache).get(ns, d), features, atol=1e-5, rtol=1e-4)
    assert len(_shard_entries(cache)) == 8
    files = sorted(data.rglob("*.png"))
    np.testing.assert_allclose(again.predict_proba(files), first.predict_proba(files), atol=1e-4)
    run = again.save(tmp_path / "run")
    assert json.loads((run / "data.json").read_text())["cache_recomputed"][0]["entry"] == recomputed[0]["entry"]


@pytest.mark.parametrize("old,new", [(b'"F32"', b'"U32"'), (b'"F32"', b'"I32"'), (b"[7,5]", b"[5,7]")])
def test_an_entry_whose_header_says_another_dtype_or_shape_is_not_served(tmp_path, old, new):
    """Header edits that keep the byte count (found by the fuzz test below: "F32" -> "U32" served uint32 data)."""
    cache = FeatureCache(tmp_path)
    features = torch.linspace(-3, 3, 7 * 5).reshape(7, 5)
    cache.put("ns", "cd" * 16, features)
    path = cache._path("ns", "cd" * 16)
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new))
    assert cache.get("ns", "cd" * 16) is None
    assert cache.corrupt == [str(path)] and not path.exists()


@pytest.fixture(scope="module")
def one_entry(tmp_path_factory):
    """A cache holding one entry: (cache, namespace, digest, features, the entry's bytes)."""
    root = tmp_path_factory.mktemp("cache")
    cache = FeatureCache(root)
    features = torch.linspace(-3, 3, 7 * 5).reshape(7, 5)
    cache.put("ns", "ab" * 16, features)
    return cache, "ns", "ab" * 16, features, cache._path("ns", "ab" * 16).read_bytes()


@settings(max_examples=fuzz_examples(150), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 400)))
def test_a_damaged_entry_is_never_served(one_entry, edits, cut):
    """Any bytes changed or cut: ``get`` gives the stored features exactly, or None (recompute); never raises."""
    cache, ns, digest, features, good = one_entry
    data = bytearray(good)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        del data[cut:]
    cache._path(ns, digest).write_bytes(bytes(data))
    got = cache.get(ns, digest)
    assert got is None or torch.equal(got, features)
    if got is None:
        assert not cache._path(ns, digest).exists()  # dropped, so the next run recomputes it


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """A cache holding one shard of two entries: (cache root, digests, features, the shard's bytes)."""
    root = tmp_path_factory.mktemp("shard")
    features = torch.linspace(-3, 3, 2 * 7 * 5).reshape(2, 7, 5)
    digests = ["ab" * 16, "cd" * 16]
    FeatureCache(root).put_many("ns", digests, features)
    (shard,) = (root / "ns").glob("*.safetensors")
    return root, digests, features, shard.read_bytes()


@settings(max_examples=fuzz_examples(150), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 600)))
def test_a_damaged_shard_never_serves_wrong_features(one_shard, edits, cut):
    """Any bytes of a shard changed or cut: each entry reads back exactly or as None (recompute); never raises."""
    root, digests, features, good = one_shard
    for f in (root / "ns").glob("*.safetensors"):
        f.unlink()
    data = bytearray(good)
    for pos, value in edits:
        data[pos % len(data)] = value
    if cut is not None:
        del data[cut:]
    (root / "ns" / "shard.safetensors").write_bytes(bytes(data))
    cache = FeatureCache(root)
    for digest, expected in zip(digests, features):
        got = cache.get("ns", digest)
        assert got is None or torch.equal(got, expected)
    again = FeatureCache(root)  # what a damaged shard left behind reads back the same way
    for digest, expected in zip(digests, features):
        got = again.get("ns", digest)
        assert got is None or torch.equal(got, expected)
    assert again.corrupt == []  # the damage was dropped the first time


def test_not_enough_disk_for_the_cache_fails_before_extraction(tmp_path, monkeypatch, image_folder):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with refusing_reads(image_folder), \
            pytest.raises(StorageError, match=r"needs about .* for 24 images .* has 0.0 MB free.*--no-cache"):
        headstart.ImageClassifier(**FAST, cache=tmp_path / "c").fit(image_folder)


def test_unwritable_cache_folder_fails_before_extraction(tmp_path, image_folder):
    (tmp_path / "a-file").write_text("x")
    with refusing_reads(image_folder), pytest.raises(StorageError, match="cannot be written.*--no-cache"):
        headstart.ImageClassifier(**FAST, cache=tmp_path / "a-file" / "cache").fit(image_folder)


def test_no_cache_needs_no_room(tmp_path, monkeypatch, image_folder):
    monkeypatch.setattr(shutil, "disk_usage", _must_not_run)
    clf = headstart.ImageClassifier(**FAST, cache=False).fit(image_folder)
    assert clf.report_.backbone_passes == {"train": 16, "val": 8}


def test_a_cache_that_fills_up_mid_run_does_not_stop_the_run(tmp_path, image_folder):
    with disk_full_under(tmp_path / "c") as refused:  # the room check and the key file fit; the entries do not
        clf = headstart.ImageClassifier(**FAST, cache=tmp_path / "c").fit(image_folder)
    assert clf.metrics_["val"]["accuracy"] == 1.0
    assert "No space left" in clf.report_.cache_write_error
    assert len(refused) == 1  # tried once, then the run went on without storing
    assert _entries(tmp_path / "c") == [] and not list((tmp_path / "c").rglob("*.tmp"))


def test_extraction_without_damage_reports_nothing(tmp_path, image_folder):
    bb = headstart.create_backbone("test_tiny")
    paths = sorted(image_folder.rglob("*.png"))
    cache = FeatureCache(tmp_path / "c")
    first = extract_features(bb, paths, cache)
    second = extract_features(bb, paths, cache)
    assert second.cached == len(paths) and second.recomputed == [] and cache.corrupt == []
    assert torch.equal(first.features, second.features)


def _must_not_run(*a, **k):
    raise AssertionError("this must not be reached")


def test_a_full_cache_needs_no_more_room(tmp_path, monkeypatch, image_folder):
    """A re-run whose features are all stored is not refused for lack of room it will not use."""
    kw = FAST | {"weights": weights_file(tmp_path / "w.safetensors"), "cache": tmp_path / "c"}
    headstart.ImageClassifier(**kw).fit(image_folder)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    again = headstart.ImageClassifier(**kw).fit(image_folder)
    assert again.report_.from_cache == {"train": 16, "val": 8}


def test_predicting_with_an_unwritable_cache_still_predicts(tmp_path, image_folder):
    (tmp_path / "a-file").write_text("x")
    bb = headstart.create_backbone("test_tiny")
    cache = FeatureCache(tmp_path / "a-file" / "cache")
    ex = extract_features(bb, sorted(image_folder.rglob("*.png")), cache)
    assert len(ex.ok) == 24 and ex.errors == [] and cache.write_error


def _cache_bytes(cache: FeatureCache) -> int:
    return sum(p.stat().st_size for p in cache.root.rglob("*.safetensors"))


def test_an_averaging_head_keeps_and_caches_one_vector_per_image(tmp_path):
    """``pool="avg"``: (N, C) features in memory and in the cache (a sixteenth of the maps' bytes here, 1/49 for
    efficientnet_lite0), the same numbers as averaging the maps; a run that needs maps computes them once."""
    from headstart.backbones import create_backbone

    data = make_folder(tmp_path / "d", per_class=3, val_per_class=0)
    paths = sorted(data.rglob("*.png"))
    bb = create_backbone("test_tiny", weights_file(tmp_path / "w.safetensors")).freeze()
    cache = FeatureCache(tmp_path / "cache")
    pooled = extract_features(bb, paths, cache, pool="avg", engine="torch", progress=False)
    assert pooled.computed == len(paths) and tuple(pooled.features.shape) == (len(paths), 32)
    assert _cache_bytes(cache) < len(paths) * 4 * 32 * 4 * 4 / 2  # maps would be 32 x 4 x 4 floats each
    again = extract_features(bb, paths, cache, pool="avg", engine="torch", progress=False)
    assert again.computed == 0
    torch.testing.assert_close(again.features, pooled.features)
    maps = extract_features(bb, paths, cache, engine="torch", progress=False)
    assert maps.computed == len(paths) and tuple(maps.features.shape) == (len(paths), 32, 4, 4)
    torch.testing.assert_close(pooled.features, maps.features.mean(dim=(2, 3)))


def test_an_averaging_head_is_served_from_maps_an_earlier_run_cached(tmp_path):
    from headstart.backbones import create_backbone

    data = make_folder(tmp_path / "d", per_class=3, val_per_class=0)
    paths = sorted(data.rglob("*.png"))
    bb = create_backbone("test_tiny", weights_file(tmp_path / "w.safetensors")).freeze()
    cache = FeatureCache(tmp_path / "cache")
    maps = extract_features(bb, paths, cache, engine="torch", progress=False)
    pooled = extract_features(bb, paths, cache, pool="avg", engine="torch", progress=False)
    assert maps.computed == len(paths) and pooled.computed == 0
    torch.testing.assert_close(pooled.features, maps.features.mean(dim=(2, 3)))
